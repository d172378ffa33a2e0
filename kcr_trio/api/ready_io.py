"""Hypercorn's request messages and response writes without a scheduler round trip when ready.

Trio's blocking primitives checkpoint even when they need not block: ``MemoryReceiveChannel.receive``
with a message already queued, and ``Lock.acquire`` of a free lock, both yield to the scheduler
before returning (``cancel_shielded_checkpoint``). On Hypercorn's path that is

* every ASGI ``receive()`` of the app: the request body Hypercorn already queued (a small JSON body
  arrives in one segment with its head, so an ``/exec`` body is two queued messages: its bytes, and
  the empty last one) costs one loop iteration per message, and
* every write of response bytes: ``TCPServer.protocol_send`` takes its send lock before the socket
  write, so the answer's bytes wait one loop iteration before they leave.

A loop iteration is an ``epoll_wait`` plus whatever else is runnable, measured in tens of µs each on
this VM at one request at a time, on the critical path of every answer. Both cuts keep everything
else as it was: the same messages in the same order, the same lock held around the same shielded
write, the same cancellation check first (``checkpoint_if_cancelled``, which raises if the task is
cancelled and otherwise does not yield); only the yield when nothing has to wait goes. A receive that
finds nothing queued, and a write that finds the lock taken, wait exactly as before. Nothing starves:
Hypercorn's app queue is bounded (``max_app_queue_size``), and a write yields after the system call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

Receive = Callable[[], Awaitable[Any]]


def ready_first(receive: Receive) -> Receive:
    """``receive`` that returns an already queued message without yielding (Hypercorn's ASGI
    ``receive`` is its app queue's bound ``MemoryReceiveChannel.receive``; anything else is
    returned unchanged)."""
    channel = getattr(receive, "__self__", None)
    if not isinstance(channel, trio.MemoryReceiveChannel):
        return receive

    async def receive_ready() -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return channel.receive_nowait()
        except trio.WouldBlock:
            return await channel.receive()

    return receive_ready


class ReadyReceive:
    """ASGI wrapper (the outermost, so every layer below reads through it): :func:`ready_first`
    for the requests ``when(method, path)`` selects (``POST /exec``, served by ``api.exec_fast``:
    the Quart routes keep their timing, which decides e.g. whether Quart's body task has read a
    body before an early answer, and with it that answer's ``Connection: close``)."""

    def __init__(self, app: Any, when: Callable[[str, str], bool]) -> None:
        self.app = app
        self.when = when

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.when(scope["method"], scope["path"]):
            receive = ready_first(receive)
        await self.app(scope, receive, send)


def install_ready_send() -> None:
    """``TCPServer.protocol_send`` writes response bytes without a yield when its lock is free.

    Hypercorn's holds ``send_lock`` around a shielded ``send_all`` and reports a broken or closed
    stream to the protocol as ``Closed`` inside the lock; this does the same, taking a free lock
    with ``acquire_nowait`` (a trio lock with no owner has no waiters: release hands it over).
    Process-wide, idempotent; wraps whatever ``protocol_send`` is installed (``api.wire``'s)."""
    from hypercorn.events import Closed, RawData
    from hypercorn.trio import tcp_server

    server_class = tcp_server.TCPServer
    if getattr(server_class, "_kcr_ready_send", False):
        return
    original = server_class.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        lock: trio.Lock = self.send_lock
        if type(event) is not RawData or lock.locked():
            await original(self, event)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        lock.acquire_nowait()
        try:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            lock.release()

    server_class.protocol_send = protocol_send  # type: ignore[method-assign]
    server_class._kcr_ready_send = True  # type: ignore[attr-defined]
