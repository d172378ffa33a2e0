"""A small HTTP/1.1 server for the sidecar's ASGI app: h11 on Trio streams, one task per connection.

Why not Hypercorn (which the API server uses): a sidecar serves one caller at a time, and its hot path
is a pre-warmed ``print('hi')`` that finishes in well under a millisecond. Hypercorn's per-request
machinery (an app task, channels between it and the protocol, timers) cost about 0.8 ms per request
here, as much as the run itself. This server calls the app inline in the connection's own task and
writes each response with as few ``send`` calls as possible; it implements exactly what the sidecar
needs, no more:

* HTTP/1.1 keep-alive (idle connections close after ``keep_alive_timeout``; what an app left
  unread of a request body is drained, within limits, so the connection stays usable), ``Expect:
  100-continue`` (answered when the app first reads the body), chunked or sized request bodies, HEAD;
* malformed requests answered 400 (431 for oversized heads) without reaching the app;
* **disconnect detection**: once the request body has been read, ``receive()`` waits for the
  connection to close and then returns ``http.disconnect``. That is what lets ``/execute`` cancel a
  run the moment its caller goes away (``app.py``);
* graceful shutdown: on ``shutdown`` the listener closes, idle connections close at once, and
  requests in flight get ``graceful_timeout`` seconds before they are cancelled.

Only the parts of ASGI's ``http`` scope the app uses are filled in (``method``, ``path``,
``raw_path``, ``query_string``, ``headers``); there is no lifespan protocol.
"""

from __future__ import annotations

import re
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11
import trio

from sidecar.httpexchange import READ_SIZE, Exchange, FastExchange
from sidecar.httpexchange import Closed as _Closed
from sidecar.httpexchange import Date as _Date
from sidecar.httpfast import REASONS, Head, parse_head

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


_BLANK_LINE = re.compile(rb"\n\r?\n")


class Server:
    def __init__(self, app: App, *, keep_alive_timeout: float = 75.0, graceful_timeout: float = 1.0,
                 max_head_size: int = 64 * 1024, max_drain_size: int = 1 << 20, drain_timeout: float = 5.0,
                 log: Callable[..., None] | None = None) -> None:
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
        self.graceful_timeout = graceful_timeout
        self.max_head_size = max_head_size
        self.max_drain_size = max_drain_size  # unread request body dropped to keep a connection
        self.drain_timeout = drain_timeout
        self.log = log
        self.stopping = False
        self._idle: dict[object, trio.CancelScope] = {}  # connections waiting for their next request

    async def serve(self, sock: socket.socket, shutdown: trio.Event,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``sock`` (already listening) until ``shutdown`` is set, then drain."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(self._accept, listener, connections)
                task_status.started()
                await shutdown.wait()
                acceptor.cancel_scope.cancel()
            await listener.aclose()
            self.stopping = True
            for scope in list(self._idle.values()):
                scope.cancel()
            connections.cancel_scope.deadline = trio.current_time() + self.graceful_timeout

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                if self.log:
                    self.log("accept_failed", error=str(exc))
                await trio.sleep(0.1)
                continue
            connections.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(self, stream)
        try:
            await conn.run()
        except _Closed:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_head_size)
        self.eof = False
        # Fast path (``httpfast.py``): while every request on this connection has the plain shape
        # the API server sends, h11 is not used; ``buf`` holds the bytes read and not yet consumed.
        # The first request of any other shape hands ``buf`` (and the EOF, if seen) to h11, which
        # then serves the connection to its end exactly as before.
        self.fast = True
        self.buf = b""

    async def _receive(self) -> bytes:
        """The next bytes from the peer; none (and ``eof`` set) once it closed or the link broke."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
        return data

    async def _read(self) -> None:
        """Fast path: read more bytes into ``buf`` (none: the peer closed)."""
        self.buf += await self._receive()

    async def _fast_head(self, idle_timeout: float) -> Head | None:
        """The next request's head if it has the plain shape; else ``None`` and h11 takes over."""
        limit = self.server.max_head_size
        while (blank := _BLANK_LINE.search(self.buf)) is None:  # where h11 sees the head end
            if len(self.buf) > limit or self.eof:
                break
            with trio.move_on_after(idle_timeout) as idle:
                await self._read()
            if idle.cancelled_caught or (self.eof and not self.buf):
                raise _Closed
        else:
            end = blank.start() - 1  # the plain shape ends with CRLF CRLF; a bare LF goes to h11
            if end >= 0 and blank.end() - end == 4 and self.buf[end] == 13 and end + 4 <= limit \
                    and (head := parse_head(self.buf[:end])) is not None:
                self.buf = self.buf[end + 4:]
                return head
        self.fast = False
        self.h11.receive_data(self.buf)
        self.buf = b""
        if self.eof:
            self.h11.receive_data(b"")
        return None

    # --- reading --------------------------------------------------------------------------------
    async def _fill(self) -> None:
        """Read more bytes into h11 (an empty read tells it the peer closed)."""
        self.h11.receive_data(await self._receive())

    async def _next_event(self, idle_timeout: float) -> Any:
        """The next h11 event, reading as needed; raises ``_Closed`` on EOF or a long silence."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.eof:
                    raise _Closed
                with trio.move_on_after(idle_timeout) as idle:
                    await self._fill()
                if idle.cancelled_caught:
                    raise _Closed
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed
            return event

    # --- the request/response cycle ---------------------------------------------------------------
    async def run(self) -> None:
        srv = self.server
        while True:
            if srv.stopping:
                return
            scope = trio.CancelScope()
            srv._idle[self] = scope
            fast: Head | None = None
            try:
                with scope:
                    if self.fast:
                        fast = await self._fast_head(srv.keep_alive_timeout)
                    if fast is None:
                        request = await self._next_event(srv.keep_alive_timeout)
            except h11.RemoteProtocolError as exc:
                await self._reject(exc)
                return
            finally:
                srv._idle.pop(self, None)
            if scope.cancelled_caught:
                return
            if fast is not None:
                exchange = await self._handle(fast)
                assert isinstance(exchange, FastExchange)
                if exchange.remaining:
                    await self._drain_fast(exchange)
                if exchange.remaining or exchange.close_after or srv.stopping:
                    return
                continue
            assert isinstance(request, h11.Request)
            # h11 checks the limit only while a head is incomplete; one that arrived whole in a
            # couple of reads can be larger, so measure the parsed head as well.
            head = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers) + 16
            if head > srv.max_head_size:
                await self._reject(h11.RemoteProtocolError("request head too large", 431))
                return
            await self._handle(request)
            if self.h11.their_state is h11.SEND_BODY:
                await self._drain()
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE and not srv.stopping:
                self.h11.start_next_cycle()
            else:
                return

    async def _drain(self) -> None:
        """Read and drop what the app left of the request body, so the connection can be reused.

        Apps answer before the body's end more often than not: a GET's empty body, a multipart
        parser that stops at the closing boundary while the chunked terminator is still on its
        way. Closing instead breaks the client: it has its whole answer, puts the connection back
        in its pool, and its next request meets a reset (the bytes still in flight make the
        kernel answer RST). Bounded by ``max_drain_size`` bytes and ``drain_timeout`` seconds;
        past either, the connection is closed.
        """
        left = self.server.max_drain_size
        with trio.move_on_after(self.server.drain_timeout):
            try:
                while self.h11.their_state is h11.SEND_BODY:
                    event = await self._next_event(self.server.drain_timeout)
                    if isinstance(event, h11.Data):
                        left -= len(event.data)
                        if left < 0:
                            return
            except h11.RemoteProtocolError:
                return

    async def _drain_fast(self, exchange: FastExchange) -> None:
        """``_drain`` for the fast path: the unread rest of a sized body, within the same limits."""
        if exchange.remaining > self.server.max_drain_size:
            return
        with trio.move_on_after(self.server.drain_timeout):
            while exchange.remaining:
                if not self.buf:
                    await self._read()
                    if self.eof:
                        return
                take = min(len(self.buf), exchange.remaining)
                self.buf, exchange.remaining = self.buf[take:], exchange.remaining - take

    async def _reject(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint if exc.error_status_hint in (400, 413, 414, 431) else 400
        body = b'{"detail": "Bad request: ' + str(exc).replace('"', "'").encode("ascii", "replace") + b'"}'
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # h11 lets a server answer
            return  # from IDLE when the request line itself was garbage
        try:
            data = self.h11.send(h11.Response(status_code=status, reason=REASONS[status], headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), (b"date", _Date.now())]))
            data += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
            await self.stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, request: h11.Request | Head) -> Exchange:
        target = request.target
        raw_path, _, query = target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1" if isinstance(request, Head) else request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "headers": [(k, v) for k, v in request.headers],  # both readers lower-case names
        }
        exchange = FastExchange(self, request) if isinstance(request, Head) else \
            Exchange(self, request.method == b"HEAD")
        try:
            await self.server.app(scope, exchange.receive, exchange.send)
        except _Closed:
            raise
        except Exception as exc:  # a bug in the app: answer 500 if we still can, and drop the connection
            if isinstance(exc, ExceptionGroup) and exc.subgroup(lambda e: not isinstance(e, _Closed)) is None:
                raise _Closed from None  # an app nursery saw the connection break: no bug
            if self.server.log:
                self.server.log("http_app_error", error=traceback.format_exc(limit=8))
            else:
                traceback.print_exc(file=sys.stderr)
            if exchange.can_restart():  # no byte of the answer has gone out yet
                exchange.started, exchange._start = False, None
                await exchange.send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", b"35")]})
                await exchange.send({"type": "http.response.body",
                                     "body": b'{"detail": "Internal Server Error"}'})
            raise _Closed from None
        if not exchange.finished:  # the app returned without a complete answer (e.g. a disconnect)
            raise _Closed
        return exchange
