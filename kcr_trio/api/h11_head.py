"""One socket write for a small answer: the response head goes out with the first body bytes.

Hypercorn writes an HTTP/1.1 answer as h11 hands it over: the status line and headers in one
``send``, then each body chunk in another. For the small JSON answers that make up most requests
(``/files`` listings, probes, errors) that is two system calls, and two trips through Hypercorn's
send lock and Trio's scheduler, for one packet's worth of bytes; profiled on ``GET /files/{sid}``,
socket sends were the largest single cost left once Quart and the Redis bridge were out of the path.

:func:`install_coalesced_head` holds the head of an answer that declares a small
``Content-Length`` (at most :data:`MAX_HELD_BODY` bytes) until the first body bytes and writes both
together. Only such answers: their body follows at once (the app has it in hand), so nothing waits
on the head. Streaming answers (``/exec`` heartbeats, which must reach the client at once, and
downloads) carry no or a large ``Content-Length`` and are written as before. Any other event
(``EndOfMessage`` of a ``HEAD``/``204`` answer, an error) flushes a held head first, so the order of
bytes on the wire never changes. Process-wide, idempotent, plain HTTP/1.1 only (h2 is untouched).
"""

from __future__ import annotations

from typing import Any

MAX_HELD_BODY = 64 * 1024


def install_coalesced_head() -> None:
    import h11
    from hypercorn.events import RawData
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_kcr_coalesced_head", False):
        return
    original = H11Protocol._send_h11_event

    def small_body(event: Any) -> bool:
        for name, value in event.headers:
            if name == b"content-length":
                return bool(value.isdigit()) and 0 < int(value) <= MAX_HELD_BODY
        return False

    async def _send_h11_event(self: Any, event: Any) -> None:
        head: bytes | None = getattr(self, "_kcr_head", None)
        if head is None:
            if type(event) is h11.Response and small_body(event):
                try:
                    self._kcr_head = self.connection.send(event)
                except h11.LocalProtocolError:
                    if self.connection.their_state != h11.ERROR:
                        raise
                return
            await original(self, event)
            return
        self._kcr_head = None
        if type(event) is h11.Data:
            try:
                data = self.connection.send(event)
            except h11.LocalProtocolError:
                if self.connection.their_state != h11.ERROR:
                    raise
                data = b""
            await self.send(RawData(data=head + data))
            return
        await self.send(RawData(data=head))
        await original(self, event)

    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    H11Protocol._kcr_coalesced_head = True  # type: ignore[attr-defined]
