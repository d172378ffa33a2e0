"""A sized answer leaves in one socket write: the response head waits for the first body bytes.

Hypercorn writes an HTTP/1.1 response as it gets the ASGI messages: the head on
``http.response.start``, the body on ``http.response.body``, two ``send()`` calls. On loopback (and
in a VM) a ``send`` is where the kernel does the receiving side's TCP work and wakes the reader, so
each costs real CPU on the latency path of every request, and the client wakes twice per answer.
Measured with py-spy on ``/exec`` at c=1: the socket sends were ~17 % of the server process's CPU.

For a response whose length is known (``Content-Length``: every JSON answer and error), the head is
held and written together with the first body bytes (or with the end of the message, for a body that
never comes, e.g. ``HEAD``). Nothing else changes: h11's state moves exactly as before (the head is
still *sent* to h11 at once, only its bytes wait, in memory, for the next write of the same
connection), and any other event of the connection (close, idle) writes the held head first.
Streamed answers (a committed ``/exec`` with heartbeats, downloads without a length) are untouched:
their head goes out at once, as the heartbeat contract needs (``keepalive.md``).

It wraps one method of Hypercorn's HTTP/1.1 protocol class, process-wide (as ``api.wire`` does for
its own edges); the sidecar's own HTTP server does not use Hypercorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

_HELD = "_kcr_held_head"


def _sized(headers: Any) -> bool:
    return any(name.lower() == b"content-length" for name, _ in headers)


def install_one_write_answers() -> None:
    """Hold a sized response's head until its body is written (idempotent)."""
    from hypercorn.events import RawData
    from hypercorn.protocol.events import Response
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_kcr_one_write", False):
        return
    original_init = H11Protocol.__init__
    original_stream_send = H11Protocol.stream_send

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        write: Callable[[Any], Awaitable[None]] = self.send
        setattr(self, _HELD, None)

        async def send(event: Any) -> None:
            held = getattr(self, _HELD)
            if held is True:  # the head of a sized answer: keep its bytes for the next write
                if isinstance(event, RawData):
                    setattr(self, _HELD, event.data)
                    return
                setattr(self, _HELD, None)
            elif held is not None:
                setattr(self, _HELD, None)
                if isinstance(event, RawData):
                    event = RawData(data=held + event.data, address=event.address)
                else:
                    await write(RawData(data=held))
            await write(event)

        self.send = send

    async def stream_send(self: Any, event: Any) -> None:
        if (isinstance(event, Response) and event.status_code >= 200 and _sized(event.headers)
                and getattr(self, _HELD, None) is None):
            setattr(self, _HELD, True)  # the next write (the head's bytes) is held
            try:
                await original_stream_send(self, event)
            finally:
                if getattr(self, _HELD) is True:  # h11 refused the head: nothing was written
                    setattr(self, _HELD, None)
            return
        await original_stream_send(self, event)

    H11Protocol.__init__ = __init__  # type: ignore[method-assign]
    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H11Protocol._kcr_one_write = True  # type: ignore[attr-defined]
