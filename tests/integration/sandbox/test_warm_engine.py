"""Warm interpreters stay warm, and the status the interpreter reports is the run's status.

Both were wrong before: the sandbox of a pre-warmed interpreter was started from a Trio worker
thread, so bubblewrap's ``--die-with-parent`` killed it when Trio retired that thread (10 s idle);
and when leftovers were killed while the interpreter was exiting, the reaped SIGTERM status
replaced the exit code the interpreter had already reported.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from sidecar import proctree
from tests.support.sandbox import run, sandboxed
from tests.support.sidecar import Sidecar, wait_until

pytestmark = pytest.mark.integration


def warm_tree(sc: Sidecar) -> set[int]:
    return {p for p in proctree.descendants(sc.pid) if proctree.alive(p)}


async def ready(client: httpx.AsyncClient) -> bool:
    async def check() -> bool:
        return (await client.get("/ready")).status_code == 200

    with trio.move_on_after(30):
        while not await check():
            await trio.sleep(0.02)
    return await check()


@pytest.mark.parametrize("language", ["py", "bash"])
async def test_idle_warm_interpreter_survives_30_seconds(language: str) -> None:
    async with sandboxed(language) as (sc, client):
        # One run first, so the interpreter waiting now was started after the server was busy
        # (the spawn happens in the background, as in production).
        res = await run(client, "print(1)" if language == "py" else "echo 1")
        assert res["exit_code"] == 0, res
        assert await ready(client)
        assert await wait_until(lambda: len(warm_tree(sc)) >= 1, timeout=10)
        before = warm_tree(sc)
        # 30 s of idling: longer than Trio's worker-thread idle timeout (10 s) three times over.
        # Not a sleep used as synchronisation: the waiting *is* the condition under test.
        await trio.sleep(30)
        assert warm_tree(sc) == before
        assert not [e for e in sc.log_lines() if e.get("event") == "prewarm_died"]
        res = await run(client, "print(2)" if language == "py" else "echo 2")
        assert res["exit_code"] == 0 and res["stdout"] == "2\n", res


SPINNERS = """import threading
def spin():
    while True:
        pass
for _ in range(8):
    threading.Thread(target=spin, daemon=True).start()
print('ok')
"""


async def test_spinning_daemon_threads_exit_0_in_50_of_50_runs() -> None:
    async with sandboxed("py") as (_sc, client):
        codes = []
        for _ in range(50):
            res = await run(client, SPINNERS)
            codes.append((res["exit_code"], res["stdout"], res["stderr"]))
        assert codes == [(0, "ok\n", "")] * 50


# Pre-warmed py, js and bash report "done" (status, after closing stdout/stderr); the sidecar then
# answers without waiting for bubblewrap's teardown, taking what is in the pipes. The status and
# every byte of output must be exactly what a plain run gives.
REPORTS = {
    "py": ("print('hi')\nraise SystemExit(3)", "import sys\nsys.stdout.write('x' * 300000)",
           "import sys\nprint('err', file=sys.stderr)\nsys.exit(2)"),
    "js": ("console.log('hi'); process.exitCode = 3;", "process.stdout.write('x'.repeat(300000));",
           "console.error('err'); process.exit(2);"),
    "bash": ("echo hi; exit 3", "head -c 300000 /dev/zero | tr '\\0' x", "echo err >&2; exit 2"),
}


@pytest.mark.parametrize("language", ["py", "js", "bash"])
async def test_reported_status_and_complete_output(language: str) -> None:
    status, big, err = REPORTS[language]
    async with sandboxed(language) as (_sc, client):
        for _ in range(5):
            res = await run(client, status)
            assert (res["exit_code"], res["stdout"], res["stderr"]) == (3, "hi\n", ""), res
            res = await run(client, big)
            assert res["exit_code"] == 0 and res["stdout"] == "x" * 300000 and res["stderr"] == "", (
                res["exit_code"], len(res["stdout"]), res["stderr"])
            res = await run(client, err)
            assert (res["exit_code"], res["stdout"], res["stderr"]) == (2, "", "err\n"), res


async def test_node_uncaught_exception_keeps_its_report_on_stderr() -> None:
    """Node emits 'exit' before printing an uncaught exception: no early report then."""
    async with sandboxed("js") as (_sc, client):
        for code in ("throw new Error('boom');", "Promise.reject(new Error('boom'));"):
            res = await run(client, code)
            assert res["exit_code"] == 1 and "Error: boom" in res["stderr"], res
        res = await run(client, "process.on('exit', (c) => { console.log('bye', c); });")
        assert (res["exit_code"], res["stdout"]) == (0, "bye 0\n"), res
