"""``api/ready_io.py``: a queued request message and a free send lock no longer cost a scheduler
round trip; everything else (order, waiting, cancellation, the lock) is as before. Real Trio
channels, locks and a real socket pair; Hypercorn's ``TCPServer.protocol_send`` as installed."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from kcr_trio.api.ready_io import install_ready_send, ready_first


async def test_queued_messages_come_in_order_without_a_yield() -> None:
    send, receive = trio.open_memory_channel[dict[str, Any]](10)
    send.send_nowait({"n": 1})
    send.send_nowait({"n": 2})
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    ready = ready_first(receive.receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        got = [await ready(), await ready()]
        assert ran == []  # no yield: the other task has not run yet
    assert got == [{"n": 1}, {"n": 2}] and ran == ["other"]


async def test_an_empty_queue_waits_as_before() -> None:
    send, receive = trio.open_memory_channel[str](10)
    ready = ready_first(receive.receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send.send, "late")
        assert await ready() == "late"
        with trio.move_on_after(0.05) as waited:
            await ready()
    assert waited.cancelled_caught


async def test_a_cancelled_reader_is_cancelled_and_loses_nothing() -> None:
    send, receive = trio.open_memory_channel[str](10)
    send.send_nowait("kept")
    ready = ready_first(receive.receive)
    with trio.CancelScope() as scope:
        scope.cancel()
        await ready()
    assert scope.cancelled_caught
    assert receive.receive_nowait() == "kept"


def test_other_receives_are_left_alone() -> None:
    async def receive() -> dict[str, Any]:
        return {}

    assert ready_first(receive) is receive


def server_of(stream: trio.SocketStream, closed: list[object]) -> Any:
    async def handle(event: object) -> None:
        closed.append(event)

    return SimpleNamespace(send_lock=trio.Lock(), stream=stream, protocol=SimpleNamespace(handle=handle))


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair()
    b.setblocking(False)
    yield trio.SocketStream(trio.socket.from_stdlib_socket(a)), b
    a.close()
    b.close()


def peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(100, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


async def test_the_answer_is_written_before_any_other_task_runs(pair: Any) -> None:
    install_ready_send()
    stream, peer = pair
    server = server_of(stream, [])
    seen: list[bytes] = []

    async def other() -> None:
        seen.append(peek(peer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await TCPServer.protocol_send(server, RawData(data=b"answer"))  # type: ignore[arg-type]
    assert seen == [b"answer"]  # Hypercorn's own took the lock with a yield: "other" saw nothing
    assert not server.send_lock.locked()


async def test_a_taken_lock_is_waited_for(pair: Any) -> None:
    install_ready_send()
    stream, peer = pair
    server = server_of(stream, [])
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with server.send_lock:
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        nursery.start_soon(TCPServer.protocol_send, server, RawData(data=b"second"))
        await trio.testing.wait_all_tasks_blocked()
        assert peek(peer) == b""  # still waiting for the lock
        release.set()
    assert peek(peer) == b"second" and not server.send_lock.locked()


async def test_a_closed_stream_is_reported_inside_the_lock(pair: Any) -> None:
    install_ready_send()
    stream, _ = pair
    closed: list[object] = []
    server = server_of(stream, closed)
    await stream.aclose()
    await TCPServer.protocol_send(server, RawData(data=b"late"))  # type: ignore[arg-type]
    assert [type(event) for event in closed] == [Closed] and not server.send_lock.locked()
