"""The real ``execute_code`` and ``bash_tool`` of ``@librechat/agents`` 3.9.x (Node) against real
``kcr-trio serve`` processes with real sidecars (contract §1, §3, §4).

Each test writes the steps a LibreChat host would take (factory params, auth headers) and runs them
through ``tests/node/librechat_tools.js``; what we assert is what the client made of our answers:
the text the model would see and the artifact the host would keep.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.jwt_keys import ed25519_key, write_pem
from tests.support.server import TEST_KEY, ServerProcess, server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "node" / "librechat_tools.js"
KEY = ed25519_key("librechat-test")
BASE_ENV = {
    "MAX_EXECUTION_TIME": "10",
    "MAX_FILE_SIZE_MB": "1",
    "MAX_OUTPUT_FILES": "2",
    "POD_POOL_PY": "1",
    "POD_POOL_BASH": "1",
    "POD_POOL_JS": "0",
    "KCR_SANDBOX": "auto",
}
STATEFUL = {"executionProfile": "stateful", "statefulSessions": True}


def jwt_headers(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY.mint(**claims)}"}


def run_tools(tmp_path: Path, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if shutil.which("node") is None:
        pytest.fail("node is required (scripts/install.sh installs it)")
    path = tmp_path / f"steps-{len(list(tmp_path.glob('steps-*')))}.json"
    path.write_text(json.dumps(steps))
    done = subprocess.run(["node", str(SCRIPT), str(path)], capture_output=True, text=True, timeout=180,
                          check=False, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def step(url: str, tool: str, input_: dict[str, Any], *, headers: dict[str, str] | None = None,
         **params: Any) -> dict[str, Any]:
    return {"tool": tool, "params": {"baseUrl": url, **params}, "input": input_,
            "authHeaders": headers if headers is not None else jwt_headers()}


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """JWT only (API keys refused), both profiles served."""
    pem = write_pem(KEY, tmp_path_factory.mktemp("jwt"))
    env = {**BASE_ENV, "KCR_AUTH_PROVIDER": "librechat-jwt", "KCR_JWT_PUBLIC_KEY_FILE": str(pem),
           "KCR_EXECUTION_PROFILES": "default,stateful"}
    with server_process(env) as server:
        yield server


def test_jwt_authenticated_runs_with_args(jwt_server: ServerProcess, tmp_path: Path) -> None:
    url = jwt_server.url
    results = run_tools(tmp_path, [
        step(url, "execute_code", {"lang": "py", "code": "import sys\nprint(sys.argv[1:])", "args": ["a", "b c"]}),
        step(url, "execute_code", {"lang": "js", "code": "console.log(process.argv.slice(2).join('|'))",
                                   "args": ["x y", "$HOME"]}, executionProfile="default"),
        step(url, "bash_tool", {"command": 'echo "$#:$1:$2"', "args": ["one", "two words"]}),
        step(url, "execute_code", {"lang": "py", "code": "print(1)"}, headers=jwt_headers(iat=0, lifetime=60)),
        step(url, "execute_code", {"lang": "py", "code": "print(1)"}, headers={"X-API-Key": TEST_KEY}),
    ])
    assert results[0]["content"].startswith("stdout:\n['a', 'b c']"), results[0]
    assert results[1]["content"].startswith("stdout:\nx y|$HOME"), results[1]
    assert results[2]["content"].startswith("stdout:\n2:one:two words"), results[2]
    unauthorized = "Execution error:\n\nCode execution is not authorized. Verify access before trying again."
    assert results[3]["error"] == unauthorized  # an expired token
    assert results[4]["error"] == unauthorized  # API keys are refused in librechat-jwt mode


def stateful_session(urls: list[str], tmp_path: Path, hint: str) -> list[dict[str, Any]]:
    """Write (execute_code), read back (bash_tool), delete (bash_tool), look again (execute_code)."""
    params = {**STATEFUL, "runtimeSessionHint": hint}
    return run_tools(tmp_path, [
        step(urls[0], "execute_code", {"lang": "py", "code": "open('/mnt/data/notes.txt', 'w').write('kept')\n"
                                       "print('written')"}, **params),
        step(urls[1 % len(urls)], "bash_tool", {"command": "cat /mnt/data/notes.txt"}, **params),
        step(urls[0], "bash_tool", {"command": "rm /mnt/data/notes.txt && echo removed"}, **params),
        step(urls[1 % len(urls)], "execute_code", {"lang": "py", "code": "import os\n"
                                                   "print(os.path.exists('/mnt/data/notes.txt'))"}, **params),
    ])


def check_stateful(results: list[dict[str, Any]]) -> None:
    written, read, removed, after = results
    assert written["content"].startswith("stdout:\nwritten"), written
    rt = written["artifact"]["runtime_session_id"]
    assert rt.startswith("rt_") and written["artifact"]["runtime_status"] == "new"
    assert [f["name"] for f in written["artifact"]["files"]] == ["notes.txt"]
    assert read["content"].startswith("stdout:\nkept"), read
    assert (read["artifact"]["runtime_session_id"], read["artifact"]["runtime_status"]) == (rt, "reused")
    assert removed["content"].startswith("stdout:\nremoved"), removed
    assert removed["artifact"]["deleted_files"] == ["notes.txt"]
    assert after["content"].startswith("stdout:\nFalse") and after["artifact"]["runtime_status"] == "reused"


def test_stateful_runtime_session_across_three_calls(jwt_server: ServerProcess, tmp_path: Path) -> None:
    check_stateful(stateful_session([jwt_server.url], tmp_path, "v2:conversation:" + "a" * 32))


def test_stateful_runtime_session_split_across_two_replicas(tmp_path: Path) -> None:
    from tests.support.redis_server import running_redis
    from tests.support.s3_server import running_s3

    pem = write_pem(KEY, tmp_path)
    with running_redis() as redis, running_s3() as s3:
        env = {**BASE_ENV, **redis.env(prefix="lc:"), **s3.env(bucket="librechat"),
               "KCR_SESSION_STORE": "redis", "KCR_FILE_STORE": "s3", "KCR_JWT_PUBLIC_KEY_FILE": str(pem),
               "KCR_EXECUTION_PROFILES": "default,stateful"}
        with server_process(env) as a, server_process(env) as b:
            check_stateful(stateful_session([a.url, b.url], tmp_path, "v2:conversation:" + "b" * 32))


def test_artifact_delivery_and_new_file_refs(jwt_server: ServerProcess, tmp_path: Path) -> None:
    url = jwt_server.url
    files = []
    for name, kind in (("agent.txt", "agent"), ("user.txt", "user"), ("SKILL.md", "skill")):
        r = httpx.post(url + "/upload", files={"file": (name, f"{kind} file".encode())}, headers=jwt_headers(),
                       timeout=30)
        assert r.status_code == 200, r.text
        up = r.json()
        files.append({"id": up["files"][0]["fileId"], "resource_id": f"res_{name}", "name": name,
                      "storage_session_id": up["storage_session_id"], "kind": kind,
                      **({"version": 2} if kind == "skill" else {})})
    results = run_tools(tmp_path, [
        # MAX_OUTPUT_FILES=2: three files written, one cannot be delivered.
        step(url, "execute_code", {"lang": "py", "code": "for n in 'xyz':\n    open(f'{n}.txt', 'w').write(n)"}),
        # The 3.9.x file-ref shape (no per-file session_id), for agent, user and skill files.
        step(url, "execute_code", {"lang": "py", "code": "for n in ('agent.txt', 'user.txt', 'SKILL.md'):\n"
                                   "    print(open(n).read())"}, files=files),
    ])
    delivery, refs = results
    assert "Artifact delivery warning: 1 of 3 generated files could not be persisted." in delivery["content"]
    assert delivery["artifact"]["artifact_delivery"] == {"code": "artifact_delivery_failed", "status": "partial",
                                                         "attempted": 3, "delivered": 2, "failed": 1}
    assert refs["content"].startswith("stdout:\nagent file\nuser file\nskill file"), refs


def test_profile_mismatch_on_a_default_only_deployment(tmp_path: Path) -> None:
    with server_process(BASE_ENV) as server:
        results = run_tools(tmp_path, [
            step(server.url, "execute_code", {"lang": "py", "code": "print(1)"}, headers={"X-API-Key": TEST_KEY},
                 **STATEFUL, runtimeSessionHint="v2:user:" + "c" * 32),
            step(server.url, "bash_tool", {"command": "echo ok"}, headers={"X-API-Key": TEST_KEY},
                 executionProfile="default"),
        ])
    assert results[0]["error"].startswith(
        "Execution error:\n\nCode execution is not supported by the selected environment."), results[0]
    assert "permanent capability mismatch" in results[0]["error"]
    assert results[1]["content"].startswith("stdout:\nok")


def test_rate_limit_body_tells_the_model_how_long(tmp_path: Path) -> None:
    with server_process({**BASE_ENV, "KCR_RATE_LIMIT_PER_HOUR": "2"}) as server:
        results = run_tools(tmp_path, [
            step(server.url, "bash_tool", {"command": "echo ok"}, headers={"X-API-Key": TEST_KEY}) for _ in range(3)
        ])
    assert [r.get("content", "")[:10] for r in results[:2]] == ["stdout:\nok"] * 2
    error = results[2]["error"]
    assert error.startswith("Execution error:\n\nCode execution is temporarily rate-limited. Retry after "), error
    assert 1 <= int(error.split("Retry after ")[1].split(" ")[0]) <= 3600
