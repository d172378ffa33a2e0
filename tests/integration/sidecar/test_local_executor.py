"""``LocalExecutor`` + ``SidecarSandbox`` with real sidecar processes."""

from __future__ import annotations

import collections
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from kcr_trio.backends.local_executor import LocalExecutor, open_local_executor
from kcr_trio.config import Settings
from kcr_trio.core.errors import Busy, NotFound, Unavailable
from sidecar import proctree
from tests.support.sidecar import pid_gone, public_tmpdir, wait_until


def make_settings(data_dir: str, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        kcr_data_dir=data_dir, pod_pool_py=1, pod_pool_js=0, pod_pool_bash=0,
        max_concurrent_executions=1, kcr_busy_retry_after=3, max_execution_time=60,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def data_dir() -> str:
    import shutil

    path = public_tmpdir("kcr-local-exec-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def sidecar_pids(ex: LocalExecutor) -> set[int]:
    return {s.process.pid for s in ex._live}


async def warm(ex: LocalExecutor, lang: str = "py", n: int = 1) -> bool:
    async def check() -> bool:
        return (await ex.status())["pools"][lang]["warm"] >= n

    with trio.move_on_after(30):
        while not await check():
            await trio.sleep(0.02)
    return await check()


async def test_run_through_the_executor_and_replenish(data_dir: str) -> None:
    async with open_local_executor(make_settings(data_dir)) as ex:
        assert await warm(ex)
        status = await ex.status()
        assert status["ready"] is True and status["capacity"] == 1 and status["in_use"] == 0
        assert status["pools"]["py"] == {"warm": 1, "target": 1}
        first = next(iter(ex._live))
        interpreter = proctree.descendants(first.process.pid)
        assert interpreter  # the pre-warmed interpreter (bwrap, its reaper, python)
        async with ex.sandbox("py", wait=5) as sb:
            assert (await ex.status())["in_use"] == 1
            await sb.put_file("in.txt", chunks(b"from upload"))
            await sb.put_file("keep.txt", chunks(b"untouched"))
            res = await sb.run("print(open('in.txt').read())\nopen('out.txt', 'w').write('x' * 5)",
                               timeout=10, request_id="rq-1")
            assert res.exit_code == 0 and res.stdout == "from upload\n" and not res.timed_out
            assert [(g.name, g.size) for g in await sb.generated_files()] == [("out.txt", 5)]
            async with sb.open_file("out.txt") as body:
                assert b"".join([c async for c in body]) == b"xxxxx"
            with pytest.raises(NotFound):
                async with sb.open_file("missing.txt"):
                    pass
        # The release runs after the answer, in the executor's nursery; the slot stays in use
        # until it ends. It resets the sidecar for its next run: every process of the run gone,
        # a new, empty working directory, and a new interpreter (one run per interpreter).
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        assert first in ex.pools["py"].ready and first.runs == 1
        assert all(pid_gone(p) for p in interpreter)
        assert list((first.directory / "wd").iterdir()) == []
        assert await wait_until(lambda: bool(proctree.descendants(first.process.pid)), timeout=15)
        assert not proctree.descendants(first.process.pid) & interpreter
        async with ex.sandbox("py", wait=5) as sb:
            res = await sb.run("import os; print(sorted(os.listdir('.')))", timeout=10, request_id="rq-2")
            assert res.exit_code == 0 and res.stdout == "['code.py']\n", res  # only its own program


async def test_busy_when_no_slot_frees_up(data_dir: str) -> None:
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        async with ex.sandbox("bash", wait=5):
            with pytest.raises(Busy) as info:
                async with ex.sandbox("bash", wait=0.2):
                    pass
            assert info.value.status == 503 and info.value.headers["Retry-After"] == "3"
        async with ex.sandbox("bash", wait=5) as sb:  # the slot is free again
            assert (await sb.run("echo ok", timeout=5, request_id="x")).stdout == "ok\n"


async def test_cancelling_run_kills_the_program_and_frees_the_slot(data_dir: str) -> None:
    async with open_local_executor(make_settings(data_dir)) as ex:
        assert await warm(ex)
        program_pid: list[int] = []
        async with ex.sandbox("py", wait=5) as sb:
            (sidecar,) = [s for s in ex._live if s not in ex.pools["py"].ready]
            pid_file = sidecar.directory / "wd" / "pid"

            def pid_written() -> bool:
                try:
                    program_pid.append(int(pid_file.read_text()))
                    return True
                except (OSError, ValueError):
                    return False

            code = "import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(300)"
            with trio.CancelScope() as scope:
                async def run_it() -> None:
                    await sb.run(code, timeout=50, request_id="rq-cancel")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_it)
                    assert await wait_until(pid_written, timeout=15)
                    # Host pids of the run (in the bubblewrap sandbox the program's own getpid()
                    # is a PID-namespace pid): bwrap, its reaper and the program.
                    victims = proctree.descendants(sidecar.process.pid)
                    assert victims
                    scope.cancel()
            # the sandbox is still held: only the dropped connection can have killed the program
            assert await wait_until(lambda: all(pid_gone(p) for p in victims), timeout=5)
            assert sidecar.process.returncode is None
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)  # released after the answer
        async with ex.sandbox("py", wait=1) as sb:
            assert (await sb.run("print('again')", timeout=10, request_id="x")).stdout == "again\n"


async def test_closing_the_executor_kills_every_sidecar(data_dir: str) -> None:
    settings = make_settings(data_dir, pod_pool_py=2, pod_pool_bash=1)
    async with open_local_executor(settings) as ex:
        assert await warm(ex, "py", 2) and await warm(ex, "bash", 1)
        pids = sidecar_pids(ex)
        children = {p for pid in pids for p in __import__("sidecar").proctree.descendants(pid)}
        assert len(pids) == 3 and children  # pre-warmed interpreters run below the sidecars
    assert await wait_until(lambda: all(pid_gone(p) for p in pids | children), timeout=5)
    assert not any(Path(ex.sandboxes_dir).iterdir())


async def test_unreachable_sidecar_is_unavailable() -> None:
    import socket

    import httpx

    from kcr_trio.backends.sidecar_client import SidecarSandbox

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    async with httpx.AsyncClient() as client:
        sb = SidecarSandbox(f"http://127.0.0.1:{port}", client=client)
        with pytest.raises(Unavailable, match="unreachable"):
            await sb.run("print(1)", timeout=5, request_id="x")


async def test_two_executors_never_share_a_run_uid(data_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("uids are only switched when running as root")
    other = public_tmpdir("kcr-local-exec-")
    try:
        async with open_local_executor(make_settings(data_dir)) as a, \
                open_local_executor(make_settings(other)) as b:
            assert await warm(a) and await warm(b)
            uids_a = {s.uid for s in a._live}
            uids_b = {s.uid for s in b._live}
            assert None not in uids_a | uids_b and not uids_a & uids_b
            # user code really runs as that uid
            async with a.sandbox("py", wait=5) as sb:
                res = await sb.run("import os\nprint(os.getuid())", timeout=10, request_id="u")
                assert int(res.stdout) in uids_a
    finally:
        import shutil

        shutil.rmtree(other, ignore_errors=True)


async def test_the_idle_allowance_follows_demand_between_languages(data_dir: str) -> None:
    """All languages together keep at most ``capacity`` idle sidecars beyond their targets. When
    runs move to another language, an idle sidecar of the old one makes room: before, every run of
    the new language destroyed its sidecar and the next one cold-started another."""
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        async with ex.sandbox("py", wait=5) as sb:
            assert (await sb.run("print(1)", timeout=10, request_id="p")).stdout == "1\n"
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        (old,) = ex.pools["py"].ready  # kept: the allowance (1 = capacity) was free
        async with ex.sandbox("bash", wait=5) as sb:
            assert (await sb.run("echo 2", timeout=10, request_id="b1")).stdout == "2\n"
        assert await wait_until(lambda: ex.in_use == 0 and old not in ex._live, timeout=15)
        assert not ex.pools["py"].ready and len(ex.pools["bash"].ready) == 1  # py made room for bash
        assert await wait_until(lambda: pid_gone(old.process.pid), timeout=15)
        (kept,) = ex.pools["bash"].ready
        async with ex.sandbox("bash", wait=5) as sb:  # the next bash run reuses it: no cold start
            assert (await sb.run("echo 3", timeout=10, request_id="b2")).stdout == "3\n"
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        assert ex.pools["bash"].ready == collections.deque([kept]) and kept.runs == 2
