"""The ``stateful`` profile: runtime sessions with a durable ``/mnt/data`` (contract §3.2), through
real ``kcr-trio serve`` processes and real sidecars; the replica test shares a real redis-server
and a real S3 server (moto) between two servers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.server import TEST_KEY, ServerProcess, server_process

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key-0123456789abcdef"
STATEFUL = {"X-API-Key": TEST_KEY, "X-CodeAPI-Expected-Profile": "stateful"}
ENV = {
    "MAX_EXECUTION_TIME": "6",
    "MAX_FILE_SIZE_MB": "1",
    "POD_POOL_PY": "2",
    "POD_POOL_BASH": "1",
    "POD_POOL_JS": "0",
    "KCR_SANDBOX": "auto",
    "KCR_EXECUTION_PROFILES": "default,stateful",
    "KCR_RUNTIME_SESSION_MAX_MB": "1",
    "API_KEYS": OTHER_KEY,
}


@pytest.fixture(scope="module")
def stateful_server() -> Iterator[ServerProcess]:
    with server_process(ENV) as server:
        yield server


def call(server: ServerProcess, lang: str, code: str, hint: str, headers: dict[str, str] = STATEFUL) -> dict:
    r = httpx.post(server.url + "/exec", json={"lang": lang, "code": code, "runtime_session_hint": hint},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-codeapi-execution-profile"] == "stateful"
    return r.json()


def write_read_delete(first: ServerProcess, second: ServerProcess, hint: str) -> None:
    """Three calls of one runtime session: write, read back, delete (then check it is gone)."""
    out = call(first, "py", "open('notes.txt', 'w').write('remember me')\nprint('written')", hint)
    assert out["stdout"] == "written\n" and out["runtime_status"] == "new"
    rt = out["runtime_session_id"]
    assert rt.startswith("rt_") and len(rt) == 43
    out = call(second, "bash", "cat notes.txt", hint)
    assert out["stdout"] == "remember me\n"
    assert (out["runtime_session_id"], out["runtime_status"]) == (rt, "reused")
    assert "deleted_files" not in out and out["files"] == []  # read only: nothing new to deliver
    out = call(first, "bash", "rm notes.txt && echo removed", hint)
    assert out["stdout"] == "removed\n" and out["deleted_files"] == ["notes.txt"]
    out = call(second, "bash", "ls notes.txt 2>&1 || echo absent", hint)
    assert out["stdout"].strip().endswith("absent") and out["runtime_status"] == "reused"


def test_write_read_delete_in_one_runtime_session(stateful_server: ServerProcess) -> None:
    write_read_delete(stateful_server, stateful_server, "v2:conversation:" + "1" * 32)


def test_sessions_are_per_hint_and_per_principal(stateful_server: ServerProcess) -> None:
    hint = "v2:user:" + "2" * 32
    call(stateful_server, "py", "open('mine.txt', 'w').write('a')", hint)
    # Another hint of the same caller: another workspace.
    out = call(stateful_server, "bash", "ls mine.txt 2>&1 || echo absent", "v2:user:" + "3" * 32)
    assert out["stdout"].strip().endswith("absent") and out["runtime_status"] == "new"
    # The same hint from another principal (another API key): another workspace too.
    other = {"X-API-Key": OTHER_KEY, "X-CodeAPI-Expected-Profile": "stateful"}
    out = call(stateful_server, "bash", "ls mine.txt 2>&1 || echo absent", hint, headers=other)
    assert out["stdout"].strip().endswith("absent") and out["runtime_status"] == "new"
    # And a default-profile call never sees a workspace (nor returns a runtime session).
    r = httpx.post(stateful_server.url + "/exec", headers={"X-API-Key": TEST_KEY}, timeout=60,
                   json={"lang": "bash", "code": "ls mine.txt 2>&1 || echo absent", "runtime_session_hint": hint})
    assert r.json()["stdout"].strip().endswith("absent") and "runtime_session_id" not in r.json()
    assert r.headers["x-codeapi-execution-profile"] == "default"


def test_concurrent_calls_are_serialised(stateful_server: ServerProcess) -> None:
    """Each call reads a counter, waits, writes it + 1: without serialisation updates are lost."""
    hint = "v2:agent-user:" + "4" * 32
    code = ("import os, time\nn = int(open('count.txt').read()) if os.path.exists('count.txt') else 0\n"
            "time.sleep(0.3)\nopen('count.txt', 'w').write(str(n + 1))\nprint(n + 1)")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: call(stateful_server, "py", code, hint), range(3)))
    assert sorted(r["stdout"].strip() for r in results) == ["1", "2", "3"]
    assert sorted(r["runtime_status"] for r in results) == ["new", "reused", "reused"]
    assert call(stateful_server, "bash", "cat count.txt", hint)["stdout"] == "3\n"


def test_workspace_size_limit(stateful_server: ServerProcess) -> None:
    """KCR_RUNTIME_SESSION_MAX_MB=1: the second 0.6 MB file does not fit and the response says so."""
    hint = "v2:user:" + "5" * 32
    code = "for n in ('a.bin', 'b.bin'):\n    open(n, 'wb').write(b'x' * 600_000)"
    out = call(stateful_server, "py", code, hint)
    assert len(out["files"]) == 2  # both are delivered as outputs of this call...
    assert out["artifact_delivery"] == {"code": "artifact_delivery_failed", "status": "partial",
                                        "attempted": 2, "delivered": 1, "failed": 1}
    assert "b.bin was not kept in the runtime session" in out["stderr"]
    out = call(stateful_server, "bash", "ls *.bin", hint)  # ...but only one persists
    assert out["stdout"].split() == ["a.bin"]


def test_two_replicas_share_runtime_sessions_through_redis_and_s3() -> None:
    from tests.support.redis_server import running_redis
    from tests.support.s3_server import running_s3

    with running_redis() as redis, running_s3() as s3:
        env = {**ENV, **redis.env(prefix="rt:"), **s3.env(bucket="runtime"),
               "KCR_SESSION_STORE": "redis", "KCR_FILE_STORE": "s3"}
        with server_process(env) as a, server_process(env) as b:
            write_read_delete(a, b, "v2:conversation:" + "6" * 32)
            # The lock is shared too: concurrent calls on both replicas still serialise.
            hint = "v2:conversation:" + "7" * 32
            code = ("import os, time\nn = int(open('c.txt').read()) if os.path.exists('c.txt') else 0\n"
                    "time.sleep(0.3)\nopen('c.txt', 'w').write(str(n + 1))")
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda s: call(s, "py", code, hint), [a, b, a, b]))
            assert call(b, "bash", "cat c.txt", hint)["stdout"] == "4\n"
