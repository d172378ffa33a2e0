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
