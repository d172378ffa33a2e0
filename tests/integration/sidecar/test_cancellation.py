"""A caller that hangs up mid-execution gets the whole process tree killed.

Asserted on the process table: every pid the program reported (itself, a background job, a
grandchild that left the session with ``setsid``) must vanish from ``/proc``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.support.sidecar import Sidecar, pid_gone, running_sidecar, wait_until

PY_TREE = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        with open('grandchild.pid', 'w') as f:
            f.write(str(os.getpid()))
        time.sleep(300)
        os._exit(0)
    os._exit(0)
os.waitpid(pid, 0)
with open('main.pid', 'w') as f:
    f.write(str(os.getpid()))
time.sleep(300)
"""

BASH_TREE = """
sleep 300 &
echo $! > bg.pid
setsid sleep 301 &
echo $! > setsid.pid
( trap '' TERM; sleep 302 ) &
echo $! > ignores_term.pid
echo $$ > main.pid
wait
"""


def read_pids(sc: Sidecar, names: list[str]) -> list[int] | None:
    pids = []
    for name in names:
        try:
            text = Path(sc.working_dir, name).read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pids.append(int(text))
    return pids


async def execute_then_hang_up(sc: Sidecar, code: str, names: list[str], request_id: str) -> list[int]:
    body = json.dumps({"code": code, "timeout": 120}).encode()
    head = (f"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    stream = await trio.open_tcp_stream("127.0.0.1", sc.port)
    try:
        await stream.send_all(head + body)
        assert await wait_until(lambda: read_pids(sc, names) is not None, timeout=15)
        pids = read_pids(sc, names)
        assert pids is not None
        assert all(not pid_gone(p) for p in pids)
    finally:
        await stream.aclose()  # the caller goes away
    return pids


async def assert_tree_killed(sc: Sidecar, pids: list[int], request_id: str) -> None:
    assert await wait_until(lambda: all(pid_gone(p) for p in pids), timeout=5), [
        p for p in pids if not pid_gone(p)]
    assert await wait_until(lambda: len(sc.user_processes()) <= 1, timeout=5)
    logs = [line for line in sc.log_lines() if line.get("event") == "execution_cancelled"]
    assert await wait_until(lambda: any(
        line.get("request_id") == request_id for line in sc.log_lines()
        if line.get("event") == "execution_cancelled"), timeout=5), logs


async def test_disconnect_kills_setsid_grandchild() -> None:
    async with running_sidecar("py") as sc:
        pids = await execute_then_hang_up(sc, PY_TREE, ["main.pid", "grandchild.pid"], "rq-py")
        await assert_tree_killed(sc, pids, "rq-py")
        # the sidecar is idle again and serves the next caller
        import httpx

        async with httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
            res = (await client.post("/execute", json={"code": "print('next')", "timeout": 5})).json()
            assert res["stdout"] == "next\n"


@pytest.mark.parametrize("extra", [(), ("--run-uid", "0")], ids=["as-run-uid", "as-sidecar-user"])
async def test_disconnect_kills_bash_background_jobs(extra: tuple[str, ...]) -> None:
    # "--run-uid 0" keeps user code under the sidecar's own uid: the path non-root pods take.
    async with running_sidecar("bash", *extra) as sc:
        names = ["main.pid", "bg.pid", "setsid.pid", "ignores_term.pid"]
        pids = await execute_then_hang_up(sc, BASH_TREE, names, "rq-bash")
        await assert_tree_killed(sc, pids, "rq-bash")


async def test_disconnect_kills_cold_started_program() -> None:
    async with running_sidecar("py", "--prewarm", "false") as sc:
        pids = await execute_then_hang_up(sc, PY_TREE, ["main.pid", "grandchild.pid"], "rq-cold")
        await assert_tree_killed(sc, pids, "rq-cold")


@pytest.mark.parametrize("lang,code", [
    ("py", "open('ran', 'a').write('x')"),
    ("js", "require('fs').appendFileSync('ran', 'x')"),
    ("bash", "printf x >> ran"),
])
async def test_warm_interpreter_of_a_killed_sidecar_exits_without_running(lang: str, code: str) -> None:
    import signal

    import httpx

    from sidecar import proctree

    async with running_sidecar(lang) as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        assert (await client.post("/execute", json={"code": code, "timeout": 10})).status_code == 200
        assert await wait_until(lambda: len(sc.user_processes()) == 1, timeout=20)  # the next warm one
        (warm,) = sc.user_processes()
        sc.process.send_signal(signal.SIGKILL)
        await sc.process.wait()
        # its handshake socket hits EOF instead of "G": it must exit, not run the old code.* again
        assert await wait_until(lambda: not proctree.alive(warm), timeout=10)
        assert Path(sc.working_dir, "ran").read_text() == "x"
