"""``SidecarWire``: the run's ``POST /execute`` to a local sidecar on one kept-alive connection.

Real sidecar processes (through ``LocalExecutor``) and, for the broken-answer cases, a real TCP
server that misbehaves on purpose.
"""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from kcr_trio.backends.local_executor import LocalExecutor, open_local_executor
from kcr_trio.backends.local_sidecars import LocalSidecar
from kcr_trio.backends.sidecar_client import SidecarSandbox
from kcr_trio.backends.sidecar_wire import SidecarWire
from kcr_trio.core.errors import Unavailable
from tests.integration.sidecar.test_local_executor import data_dir, make_settings  # noqa: F401
from tests.support.sidecar import wait_until


def used(ex: LocalExecutor, sb: SidecarSandbox) -> LocalSidecar:
    """The sidecar behind ``sb``."""
    (sidecar,) = [s for s in ex._live if s.url == sb.base_url]
    return sidecar


async def test_runs_of_one_sidecar_share_one_connection(data_dir: str) -> None:  # noqa: F811
    # No warm target and one slot: a single py sidecar, started on the first run and kept.
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        seen = []
        for i in range(3):
            async with ex.sandbox("py", wait=5) as sb:
                sidecar = used(ex, sb)
                seen.append(sidecar)
                res = await sb.run(f"print({i})", timeout=10, request_id=f"rq-{i}")
                assert res.exit_code == 0 and res.stdout == f"{i}\n"
            assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        assert seen[0] is seen[1] is seen[2]  # the one sidecar, reset between runs
        assert seen[0].wire.connections == 1  # three runs and their resets, one connection


async def test_a_cancelled_run_drops_its_connection_and_the_next_run_opens_one(data_dir: str) -> None:  # noqa: F811
    # No warm target and one slot: a single py sidecar, started on the first run and kept.
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        async with ex.sandbox("py", wait=5) as sb:
            sidecar = used(ex, sb)
            assert (await sb.run("print(1)", timeout=10, request_id="a")).stdout == "1\n"
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        async with ex.sandbox("py", wait=5) as sb:
            assert sidecar.wire.connections == 1
            with trio.move_on_after(0.5):
                await sb.run("import time\ntime.sleep(60)", timeout=50, request_id="b")
            assert sidecar.wire._stream is None  # never reused after an unfinished request
        assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        async with ex.sandbox("py", wait=5) as sb:
            assert (await sb.run("print(2)", timeout=10, request_id="c")).stdout == "2\n"
        assert sidecar.wire.connections == 2


async def test_an_idle_connection_past_max_idle_is_replaced(data_dir: str) -> None:  # noqa: F811
    # No warm target and one slot: a single py sidecar, started on the first run and kept.
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        for i in range(2):
            async with ex.sandbox("py", wait=5) as sb:
                sidecar = used(ex, sb)
                sidecar.wire.max_idle = 0.0
                assert (await sb.run(f"print({i})", timeout=10, request_id="x")).stdout == f"{i}\n"
            assert await wait_until(lambda: ex.in_use == 0, timeout=15)
        # Every request (two runs, each followed by its /reset) found its connection too old.
        assert sidecar.wire.connections == 4


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_unreachable_sidecar_is_unavailable_through_the_wire() -> None:
    port = _free_port()  # nothing listens there now
    async with httpx.AsyncClient() as client:
        sb = SidecarSandbox(f"http://127.0.0.1:{port}", client=client, wire=SidecarWire(port))
        with pytest.raises(Unavailable, match="unreachable"):
            await sb.run("print(1)", timeout=5, request_id="x")


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"exit", b"garbage\r\n\r\n"])
async def test_a_sidecar_that_breaks_during_the_answer_is_a_failed_run(answer: bytes) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def misbehave() -> None:
        conn, _ = await listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await conn.recv(65536)
            if answer:
                await conn.send(answer)

    wire = SidecarWire(port)
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        nursery.start_soon(misbehave)
        sb = SidecarSandbox(f"http://127.0.0.1:{port}", client=client, wire=wire)
        res = await sb.run("print(1)", timeout=5, request_id="x")
    listener.close()
    assert res.failure and "stopped responding" in res.stderr
    assert wire._stream is None
