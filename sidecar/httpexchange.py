"""``receive``/``send`` of one request for the sidecar's HTTP server (``httpd.py``).

Two flavours: :class:`Exchange` for requests read by h11 (any shape HTTP/1.1 allows), and
:class:`FastExchange` for the plain sized requests the API server sends, read and answered without
h11 (``httpfast.py``: why, and what counts as plain). Both hand the app the same ASGI messages: the
body in one message per read, then ``http.disconnect`` once the caller closes the connection (what
lets ``/execute`` cancel a run when its caller goes away).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import h11
import trio

from sidecar.httpfast import REASONS, Head, response_head

if TYPE_CHECKING:
    from sidecar.httpd import _Connection

READ_SIZE = 65536


class Closed(Exception):
    """The peer closed the connection, or it broke."""


class Date:
    """The ``Date`` header, formatted at most once per second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.second, cls.value = t, formatdate(t, usegmt=True).encode()
        return cls.value


class Exchange:
    """``receive``/``send`` for one request."""

    def __init__(self, conn: _Connection, head: bool) -> None:
        self.conn = conn
        self.head = head
        self.body_done = False
        self.started = False
        self.finished = False
        self._start: dict[str, Any] | None = None

    def can_restart(self) -> bool:
        return self.conn.h11.our_state is h11.SEND_RESPONSE

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        if self.finished or conn.eof:
            return {"type": "http.disconnect"}
        if not self.body_done:
            if conn.h11.they_are_waiting_for_100_continue:
                go_on = h11.InformationalResponse(status_code=100, reason=b"Continue", headers=[])
                await self._write(conn.h11.send(go_on))
            chunks: list[bytes] = []
            while True:  # hand over everything that is already buffered, in one message
                try:
                    event = await conn._next_event(conn.server.keep_alive_timeout) if not chunks else \
                        conn.h11.next_event()
                except (Closed, h11.RemoteProtocolError):
                    return {"type": "http.disconnect"}
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                    continue
                if isinstance(event, h11.EndOfMessage):
                    self.body_done = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return {"type": "http.request", "body": b"".join(chunks), "more_body": True}
        # The body is complete: what remains to learn is whether the caller goes away. Bytes that
        # arrive meanwhile (a pipelined request) stay buffered in h11 for the next cycle.
        while not conn.eof:
            if len(conn.h11.trailing_data[0]) > conn.server.max_head_size:
                await trio.sleep_forever()  # stop reading; the caller will wait for our answer
            await conn._fill()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self._start = message
            self.started = True
            return
        if kind != "http.response.body" or self._start is None or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        h = self.conn.h11
        data = b""
        if h.our_state is h11.SEND_RESPONSE:  # the head goes out with the first body bytes
            headers = list(self._start.get("headers", ()))
            headers.append((b"date", Date.now()))
            status = self._start["status"]
            data = h.send(h11.Response(status_code=status, reason=REASONS.get(status, b""),
                                       headers=headers))
        body = message.get("body", b"")
        if body and not self.head:
            data += h.send(h11.Data(data=body))
        if not message.get("more_body", False):
            data += h.send(h11.EndOfMessage())
            self.finished = True
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        try:
            await self.conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.conn.eof = True
            raise Closed from None


class FastExchange(Exchange):
    """``receive``/``send`` for a request read by the fast path: the same messages as ``Exchange``
    (the body in one message per read, then ``http.disconnect`` once the caller closes), the answer
    written without h11 (``httpfast.response_head``)."""

    def __init__(self, conn: _Connection, head: Head) -> None:
        super().__init__(conn, False)
        self.remaining = head.length  # body bytes not yet handed to the app
        self.head_sent = False
        self.left = -1  # answer body bytes still due (-1: delimited by closing the connection)
        self.close_after = False

    def can_restart(self) -> bool:
        return not self.head_sent

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        if self.finished or conn.eof:
            return {"type": "http.disconnect"}
        if not self.body_done:
            if self.remaining and not conn.buf:
                with trio.move_on_after(conn.server.keep_alive_timeout):
                    await conn._read()
                if not conn.buf:  # closed, or silent for too long
                    return {"type": "http.disconnect"}
            n = self.remaining
            body, conn.buf = conn.buf[:n], conn.buf[n:]
            self.remaining -= len(body)
            self.body_done = not self.remaining
            return {"type": "http.request", "body": body, "more_body": not self.body_done}
        # As in ``Exchange``: wait for the caller to go away; pipelined bytes stay in ``buf``.
        while not conn.eof:
            if len(conn.buf) > conn.server.max_head_size:
                await trio.sleep_forever()
            await conn._read()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await super().send(message)
            return
        if kind != "http.response.body" or self._start is None or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        data = b""
        if not self.head_sent:
            built = response_head(self._start["status"], list(self._start.get("headers", ())), Date.now())
            if built is None:
                raise RuntimeError("answer head outside what the sidecar sends")
            data, self.left = built
        body = bytes(message.get("body", b""))
        more = message.get("more_body", False)
        if self.left >= 0 and (len(body) > self.left or (not more and len(body) < self.left)):
            raise RuntimeError("answer body does not match its content-length")
        self.head_sent = True
        if self.left >= 0:
            self.left -= len(body)
        if not more:
            self.finished = True
            self.close_after = self.left < 0
        data += body
        if data:
            await self._write(data)
