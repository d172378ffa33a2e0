"""``deleted_files``, ``artifact_delivery`` (contract §4.1, §4.2) and the 3.9.x file-ref shape
(§4.4), with real sidecars and a real ``kcr-trio serve``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.ops import ops_server
from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration

H = {"X-API-Key": TEST_KEY}


def upload(server: ServerProcess, name: str, data: bytes, **fields: str) -> dict:
    r = httpx.post(server.url + "/upload", files={"file": (name, data)}, data=fields, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def run(server: ServerProcess, body: dict) -> dict:
    r = httpx.post(server.url + "/exec", json=body, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ref(up: dict, name: str, kind: str, **extra: object) -> dict:
    """A 3.9.x ``CodeEnvFile``: no per-file ``session_id``."""
    return {"id": up["files"][0]["fileId"], "resource_id": extra.pop("resource_id", "res-1"), "name": name,
            "storage_session_id": up["storage_session_id"], "kind": kind, **extra}


def test_new_file_ref_shape_mounts_agent_user_and_skill_files(real_server: ServerProcess) -> None:
    a = upload(real_server, "agent.txt", b"from the agent")
    u = upload(real_server, "user.txt", b"from the user")
    s = upload(real_server, "SKILL.md", b"from the skill")
    files = [ref(a, "agent.txt", "agent", resource_id="agent_abc"), ref(u, "user.txt", "user"),
             ref(s, "SKILL.md", "skill", resource_id="skill_1", version=3)]
    assert all("session_id" not in f for f in files)
    code = "for n in ('agent.txt', 'user.txt', 'SKILL.md'):\n    print(n, open(n).read())"
    out = run(real_server, {"lang": "py", "code": code, "files": files})
    assert out["stdout"] == "agent.txt from the agent\nuser.txt from the user\nSKILL.md from the skill\n"
    assert out["files"] == [] and "deleted_files" not in out and "artifact_delivery" not in out


def test_deleted_files_names_the_inputs_a_run_removed(real_server: ServerProcess) -> None:
    keep = upload(real_server, "keep.csv", b"a,b\n")
    gone = upload(real_server, "gone.csv", b"c,d\n")
    files = [ref(keep, "keep.csv", "user"), ref(gone, "gone.csv", "user")]
    out = run(real_server, {"lang": "bash", "code": "rm gone.csv && ls *.csv", "files": files})
    assert out["stdout"].split() == ["keep.csv"]
    assert out["deleted_files"] == ["gone.csv"]
    # Writing over an input is a change, not a deletion; nothing removed, no field.
    out = run(real_server, {"lang": "bash", "code": "echo x > keep.csv", "files": files[:1]})
    assert "deleted_files" not in out and [f["name"] for f in out["files"]] == ["keep.csv"]


def test_deleted_files_for_an_input_mounted_under_another_name(real_server: ServerProcess) -> None:
    """Two refs named data.csv: the second is mounted as data-2.csv; removing it reports that ref."""
    first = upload(real_server, "data.csv", b"1")
    second = upload(real_server, "data.csv", b"2")
    files = [ref(first, "data.csv", "user"), ref(second, "data.csv", "user", resource_id="res-2")]
    out = run(real_server, {"lang": "bash", "code": "cat data-2.csv && rm data-2.csv", "files": files})
    assert out["stdout"] == "2\n"
    assert out["deleted_files"] == ["data.csv"]


def test_artifact_delivery_reports_outputs_over_the_limits(real_server: ServerProcess) -> None:
    # MAX_OUTPUT_FILES=3: five files written, three stored.
    out = run(real_server, {"lang": "py", "code": "for i in range(5):\n    open(f'f{i}.txt', 'w').write(str(i))"})
    assert len(out["files"]) == 3
    assert out["artifact_delivery"] == {"code": "artifact_delivery_failed", "status": "partial",
                                        "attempted": 5, "delivered": 3, "failed": 2}
    assert "f3.txt" in out["stderr"] and "f4.txt" in out["stderr"]  # the model is told by name too
    # Everything delivered: the field is left out, as the contract asks.
    out = run(real_server, {"lang": "py", "code": "open('one.txt', 'w').write('1')"})
    assert len(out["files"]) == 1 and "artifact_delivery" not in out


async def test_artifact_delivery_failed_when_nothing_is_stored(tmp_path: Path) -> None:
    """The only output is over MAX_FILE_SIZE_MB (a sidecar's own file-size limit stops the write
    at the limit, so this case is driven through the in-process executor twin)."""
    big = "write:" + "x" * (1024 * 1024)
    async with ops_server(tmp_path, max_file_size_mb=1, kcr_max_code_bytes=2 * 1024 * 1024) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", json={"lang": "py", "code": big}, headers=H)
            out = r.json()
            assert out["files"] == []
            assert out["artifact_delivery"] == {"code": "artifact_delivery_failed", "status": "failed",
                                                "attempted": 1, "delivered": 0, "failed": 1}
