"""Protocol edges below the app (audit finding 12): answers Hypercorn gives on its own, and
requests whose framing is ambiguous.

* **Rejections have JSON bodies.** Hypercorn answers what h11 refuses to parse (400 malformed,
  431 header block too large, 501 unknown transfer coding) with an empty body. Every other error of
  ours is a JSON body in KubeCodeRun's shape B, and clients (and the model reading a tool error)
  deserve the same here: :func:`install_json_rejections` makes Hypercorn's error responses carry one.
  It replaces one method of Hypercorn's HTTP/1.1 protocol class, process-wide; the sidecar's own
  HTTP server does not use Hypercorn and is unaffected.
* **Half-closed clients get their answer** (:func:`install_half_close_support`); the same read
  loop reads request bodies in larger pieces (``BODY_RECV_BYTES``), and an answer given before the
  body ended (a 413 while it arrives) is followed by a *lingering* close, so the client reads it
  instead of a reset (``LINGER_SECONDS``).
* **A stalled request head gets a 408** (:func:`install_stalled_head_408`) before the connection is
  closed; an idle kept-alive connection with no byte of a new request is just closed (RFC 9110 §15.5.9).
* **Content-Length together with Transfer-Encoding** (RFC 9112 §6.3): the body is read as chunked,
  but such a request is how request smuggling starts, and the RFC says the connection must be
  closed after the response. :class:`CloseAmbiguousFraming` adds ``Connection: close``.
"""

from __future__ import annotations

import math
import time
from itertools import chain
from typing import Any

from kcr_trio.core.ids import new_id

from .errors import dumps

_REJECTIONS = {
    400: ("Malformed HTTP request", "validation"),
    408: ("Request timed out", "timeout"),
    413: ("Request too large", "resource_exhausted"),
    431: ("Request header fields too large", "validation"),
    501: ("Not implemented: unsupported transfer coding or method", "validation"),
}


def rejection_body(status: int) -> bytes:
    message, error_type = _REJECTIONS.get(status, ("Request rejected", "validation" if status < 500 else "internal_server"))
    return dumps({"error": message, "error_type": error_type, "details": None, "request_id": new_id(),
                  "timestamp": time.time()})


def install_json_rejections() -> None:
    """Give Hypercorn's own HTTP/1.1 error responses a JSON body (idempotent)."""
    import h11
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_kcr_json_rejections", False):
        return

    async def _send_error_response(self: Any, status_code: int) -> None:
        body = rejection_body(status_code)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_h11_event(
            h11.Response(status_code=status_code, headers=list(chain(headers, self.config.response_headers("h11"))))
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    H11Protocol._kcr_json_rejections = True  # type: ignore[attr-defined]



def with_connection_close(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with ``Connection: close`` if it starts a response (any other ``connection``
    header replaced); other ASGI messages pass unchanged. Hypercorn closes the socket after an
    answer that carries it, which is what every wrapper here relies on."""
    if message["type"] != "http.response.start":
        return message
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}

class CloseAmbiguousFraming:
    """ASGI wrapper: ``Connection: close`` on the answer to a request with both length headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name.lower() for name, _ in scope.get("headers", ())}
        if not (b"content-length" in names and b"transfer-encoding" in names):
            await self.app(scope, receive, send)
            return

        async def closing_send(message: dict[str, Any]) -> None:
            await send(with_connection_close(message))

        await self.app(scope, receive, closing_send)


class CloseOnEarlyAnswer:
    """ASGI wrapper: ``Connection: close`` on an answer that starts before the request body ended.

    A 413 while a too-large upload is still arriving, a 401 before the body was read: the rest of
    the body will never be read, so the connection cannot carry another request, and Hypercorn
    closes it (with a lingering close, see :func:`install_half_close_support`). Without the header a
    client that finished sending anyway (httpx does) sees a reusable connection, puts it back in its
    pool and loses its next request to the close ("server disconnected without a response").
    Only requests that announce a body are watched; others pass through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _announces_body(scope.get("headers", ())):
            await self.app(scope, receive, send)
            return
        body_done = False

        async def watching_receive() -> dict[str, Any]:
            nonlocal body_done
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: dict[str, Any]) -> None:
            await send(message if body_done else with_connection_close(message))

        await self.app(scope, watching_receive, closing_send)


def _announces_body(headers: Any) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


# -- half-closed clients --------------------------------------------------------------------------

# Bytes per socket read while a request *body* arrives. Hypercorn reads 64 KiB at a time; every read
# of a body then passes h11, Hypercorn's stream and Quart's body queue, a few task switches each.
# Twice larger reads cut that per-chunk work for uploads (measured on a 10 MB upload: 64 KiB reads
# cost ~15 % more server CPU than 128 KiB; 256 KiB saved little more and held more memory per
# upload, since Quart buffers what arrives ahead of the parser). Heads are still read 64 KiB at a time:
# h11 enforces its header-size limit (431) only on an *incomplete* head, so a larger read would let
# a larger head through whole. A read returns only what the kernel holds: a slow sender still costs
# one small chunk, not this much memory.
BODY_RECV_BYTES = 128 * 1024
# Lingering close: an answer sent before the request body ended (a 413 while a too-large body is
# still arriving, a 401 before it) is followed by closing the socket. Closed with unread data in its
# receive buffer, the kernel sends a reset, and a client that is still sending often loses the
# answer it has not read yet ("server disconnected without a response"). So the server half-closes
# first and reads and discards what still arrives, until the client closes, for at most this long
# and this much (what nginx calls a lingering close).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024
# A half-closed client is waited for at most this long (the app's own deadlines end sooner).
HALF_CLOSE_MAX_WAIT = 900.0
_POLL = 0.1
_TCP_CLOSE = 7  # tcp_info.tcpi_state after the peer reset the connection


def install_half_close_support() -> None:
    """Answer clients that half-close (``shutdown(SHUT_WR)``) after sending their request.

    Hypercorn treats end-of-input as a disconnect and cancels the request, so such a client (41 of
    224 in the audit) never got its answer. TCP cannot tell a half-close from a full close: both
    are a FIN. So when input ends while a complete request awaits a response that has not started,
    we keep serving, send an interim ``100 Continue`` and watch the socket: a client that really
    left answers that byte with a reset within a round trip (``tcp_info`` shows it) and the request
    is cancelled, as before. Input that ends once the response has started (a heartbeat committed;
    LibreChat's hang-up timer fires there) is a disconnect at once, as in Hypercorn, so a departed
    client is never noticed later than before. Plain TCP only (TLS keeps Hypercorn's behaviour).
    """
    import socket as socket_module

    import h11
    import trio
    from hypercorn.events import Closed, RawData
    from hypercorn.trio import tcp_server

    server_class = tcp_server.TCPServer
    if getattr(server_class, "_kcr_half_close", False):
        return

    def h11_of(server: Any) -> Any:
        inner = getattr(getattr(server, "protocol", None), "protocol", None)
        return inner if inner is not None and hasattr(inner, "connection") else None

    def awaiting_response(server: Any, *, started: bool = True) -> bool:
        """A complete request whose answer is not finished (``started=False``: not even begun)."""
        proto = h11_of(server)
        if proto is None or proto.stream is None or not isinstance(proto.connection, h11.Connection):
            return False
        conn = proto.connection
        states = (h11.SEND_RESPONSE, h11.SEND_BODY) if started else (h11.SEND_RESPONSE,)
        return conn.their_state is h11.DONE and conn.our_state in states

    def recv_size(server: Any) -> int:
        proto = h11_of(server)
        if proto is not None and isinstance(proto.connection, h11.Connection) and (
                proto.connection.their_state is h11.SEND_BODY):
            return BODY_RECV_BYTES
        return int(tcp_server.MAX_RECV)

    def reset(sock: Any) -> bool:
        try:
            state: int = sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_INFO, 1)[0]
            return state == _TCP_CLOSE
        except OSError:
            return True

    async def probe(server: Any) -> None:
        """Make a peer that really left say so now: an unsolicited ``100 Continue`` (every HTTP/1.1
        client must accept 1xx responses it did not ask for, RFC 9110 §15.2) reaches a closed
        socket and comes back as a reset within a round trip. Only before the final response."""
        proto = h11_of(server)
        if proto is not None and proto.connection.our_state is h11.SEND_RESPONSE:
            try:
                await proto._send_h11_event(
                    h11.InformationalResponse(status_code=100, headers=proto.config.response_headers("h11"))
                )
            except h11.LocalProtocolError:  # the final response started meanwhile: nothing to do
                pass

    async def wait_for_answer(server: Any) -> bool:
        """Wait while the answer is pending; True if the peer reset (it really left)."""
        sock = getattr(server.stream, "socket", None)
        if sock is None:
            return True
        await probe(server)
        with trio.move_on_after(HALF_CLOSE_MAX_WAIT):
            while awaiting_response(server):
                if reset(sock):
                    return True
                await trio.sleep(_POLL)
        return False

    async def _read_data(self: Any) -> None:
        self._kcr_read_done = trio.Event()
        lingered = 0
        try:
            while True:
                try:
                    if self.config.read_timeout:
                        with trio.fail_after(self.config.read_timeout):
                            data = await self.stream.receive_some(recv_size(self))
                    else:  # no read timeout (the default): no cancel scope per read either
                        data = await self.stream.receive_some(recv_size(self))
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                if getattr(self, "_kcr_lingering", False):  # answered and closing: discard the rest
                    lingered += len(data)
                    if not data or lingered > LINGER_MAX_BYTES:
                        break
                    continue
                if data == b"" and awaiting_response(self, started=False) and await wait_for_answer(self):
                    break  # the client left: Hypercorn's own handling (cancel the request)
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        finally:
            self._kcr_read_done.set()
        await self.protocol.handle(Closed())
        # Input is over: no further request can come, so the keep-alive timer must not hold the
        # connection open (the client of a half-close reads until we close).
        await self.idle_task.stop()

    original_close = server_class._close

    async def _close(self: Any) -> None:
        """Close; after an answer that came before the request body ended, linger first."""
        proto = h11_of(self)
        done = getattr(self, "_kcr_read_done", None)
        if (done is None or done.is_set() or proto is None or not isinstance(proto.connection, h11.Connection)
                or proto.connection.their_state is not h11.SEND_BODY):
            await original_close(self)
            return
        self._kcr_lingering = True
        try:
            await self.stream.send_eof()  # the client sees the answer end, then our FIN
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError, AttributeError):
            pass
        with trio.move_on_after(LINGER_SECONDS):
            await done.wait()  # the reader discards what still arrives, until EOF or the bound
        await self.stream.aclose()

    server_class._read_data = _read_data  # type: ignore[method-assign]
    server_class._close = _close  # type: ignore[method-assign]
    server_class._kcr_half_close = True  # type: ignore[attr-defined]


# -- stalled request heads --------------------------------------------------------------------------

# The idle timer looks at the connection every quarter of the head timeout (at least every 50 ms):
# a stalled head is answered 1 to 1.25 head timeouts after it was first seen, and an idle
# connection costs a handful of wake-ups per keep-alive period, not a steady poll.
_HEAD_CHECKS = 4
_MIN_STEP = 0.05


def install_stalled_head_408() -> None:
    """Answer a request head that stalls with ``408`` and its JSON body, then close.

    Hypercorn's keep-alive timer runs until a complete head arrives, and when it fires it closes the
    socket silently, whether the client sent nothing (an idle kept-alive connection: closing is
    right) or half a head (the client waits for an answer that never comes, and reads a bare EOF).
    This timer instead also watches for a partial head: once one has been buffered for
    ``config.kcr_head_timeout`` seconds (``KCR_HEAD_TIMEOUT``; default: the keep-alive timeout), or
    the keep-alive timeout ends while one is buffered, the client gets a 408 before the close. Only when nothing of a
    response was sent in this request cycle (h11 lets us send nothing else, and a 408 after a
    partial answer would corrupt the stream). Plain HTTP/1.1 only.

    The timer is one task per connection, started by Hypercorn when the connection opens; Hypercorn's
    busy/idle updates move its deadline (see ``protocol_send`` below) rather than stopping it and
    starting a new one for every request, which cost about a fifth of a ``/health`` request's CPU.
    """
    import h11
    import trio
    from hypercorn.events import RawData, Updated
    from hypercorn.trio import tcp_server

    server_class = tcp_server.TCPServer
    if getattr(server_class, "_kcr_head_408", False):
        return

    def partial_head(server: Any) -> bool:
        inner = getattr(getattr(server, "protocol", None), "protocol", None)
        conn = getattr(inner, "connection", None)
        if not isinstance(conn, h11.Connection):
            return False
        return conn.our_state is h11.IDLE and conn.their_state is h11.IDLE and bool(conn.trailing_data[0])

    async def send_408(server: Any) -> None:
        body = rejection_body(408)
        head = [b"HTTP/1.1 408 Request Timeout", b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(), b"connection: close"]
        head += [name + b": " + value for name, value in server.config.response_headers("h11")]
        with trio.move_on_after(5):  # a client that reads nothing must not hold the close
            await server.protocol_send(RawData(data=b"\r\n".join(head) + b"\r\n\r\n" + body))

    async def _idle_timeout(self: Any) -> None:
        # One watcher per connection for its whole life: ``protocol_send`` below moves its deadline
        # (busy: none; idle: the next check) instead of Hypercorn's stop + new task per request.
        keep_alive = float(self.config.keep_alive_timeout)
        head_timeout = float(getattr(self.config, "kcr_head_timeout", None) or keep_alive)
        self._kcr_idle_since = trio.current_time()
        self._kcr_idle_step = min(max(head_timeout / _HEAD_CHECKS, _MIN_STEP), keep_alive)
        partial_since: float | None = None
        seen_since: float | None = None
        try:
            while True:
                now = trio.current_time()
                since = self._kcr_idle_since
                if since != seen_since:  # a request came and went: a new idle period
                    partial_since, seen_since = None, since
                deadline = math.inf  # busy: only protocol_send wakes us, even at shutdown
                if since is not None:
                    if self.context.terminated.is_set():  # shutting down and idle: close now
                        break
                    if partial_head(self):
                        partial_since = now if partial_since is None else partial_since
                        if now - partial_since >= head_timeout:
                            break
                    else:
                        partial_since = None
                    if now >= since + keep_alive:
                        break
                    deadline = min(now + self._kcr_idle_step, since + keep_alive)
                with trio.CancelScope(deadline=deadline) as scope:
                    self._kcr_idle_scope = scope
                    if since is None:  # a request in flight is drained, never cut (graceful shutdown)
                        await trio.sleep_forever()
                    await self.context.terminated.wait()
        finally:
            self._kcr_idle_scope = None
        with trio.CancelScope(shield=True):
            if partial_head(self):
                await send_408(self)
            await self._initiate_server_close()

    original_protocol_send = server_class.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        """Hypercorn's, except that busy/idle updates move the running watcher's deadline. Measured
        on ``GET /health``: stopping the idle task and starting a new one per request (a task, a
        cancel scope, a ``Cancelled`` unwound) was ~10-17 % of the Python CPU; this cut server CPU
        per request by about a fifth."""
        scope = getattr(self, "_kcr_idle_scope", None)
        if scope is None or not isinstance(event, Updated):
            await original_protocol_send(self, event)
        elif event.idle:
            self._kcr_idle_since = now = trio.current_time()
            # Shutting down: the watcher closes the connection as soon as it is idle.
            scope.deadline = now if self.context.terminated.is_set() else now + self._kcr_idle_step
        else:
            self._kcr_idle_since = None
            scope.deadline = math.inf

    server_class.protocol_send = protocol_send  # type: ignore[method-assign]
    server_class._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    server_class._kcr_head_408 = True  # type: ignore[attr-defined]
