"""``/exec`` answers as soon as its outputs are stored; the sandbox's release comes after.

The release (reset or destruction of the sidecar) runs in the executor's own nursery, and the slot
counts as in use until it ends. The test holds the release on an event: the answer must arrive
while it is held, ``/ready`` must still count the slot, and once let go the slot frees up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import trio

from kcr_trio.backends.local_executor import open_local_executor
from tests.support.server import TEST_KEY, make_settings, running_server
from tests.support.sidecar import public_tmpdir, wait_until

pytestmark = pytest.mark.integration


async def test_answer_arrives_before_a_slow_teardown_ends() -> None:
    data_dir = Path(public_tmpdir("kcr-release-"))
    settings = make_settings(data_dir, pod_pool_py=1, pod_pool_js=0, pod_pool_bash=0,
                             max_concurrent_executions=1, max_execution_time=20)
    entered = trio.Event()
    let_go = trio.Event()
    try:
        await _run(settings, entered, let_go)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _run(settings, entered: trio.Event, let_go: trio.Event) -> None:  # type: ignore[no-untyped-def]
    async with open_local_executor(settings) as ex:
        real_reset = ex._reset

        async def slow_reset(sidecar):  # type: ignore[no-untyped-def]
            entered.set()
            with trio.move_on_after(60):  # bounded even if the test fails before letting go
                await let_go.wait()  # a deliberately slow teardown, held until the test says so
            return await real_reset(sidecar)

        ex._reset = slow_reset  # type: ignore[method-assign]
        async with running_server(settings, executor=ex) as url:
            headers = {"X-API-Key": TEST_KEY}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                resp = await client.post("/exec", json={"lang": "py", "code": "print(6 * 7)"})
                assert resp.status_code == 200 and resp.json()["stdout"] == "42\n", resp.text
                # The answer is here; the teardown starts (a few ms later) and is held.
                with trio.fail_after(10):
                    await entered.wait()
                assert not let_go.is_set()
                ready = (await client.get("/ready")).json()
                assert ready["checks"]["executor"]["in_use"] == 1
                assert ready["checks"]["executor"]["capacity"] == 1
                let_go.set()

                async def in_use() -> int:
                    return int((await client.get("/ready")).json()["checks"]["executor"]["in_use"])

                with trio.fail_after(15):
                    while await in_use() != 0:
                        await trio.sleep(0.01)
                # The reset sidecar serves the next run.
                resp = await client.post("/exec", json={"lang": "py", "code": "print('again')"})
                assert resp.status_code == 200 and resp.json()["stdout"] == "again\n", resp.text
                assert await wait_until(lambda: ex.in_use == 0, timeout=15)
