"""One kept-alive HTTP/1.1 connection to one local sidecar, for the run's ``POST /execute``.

Why not the executor's shared ``httpx.AsyncClient`` for this one call: measured at c=1 with a trivial
program, the hop server → sidecar → server cost ~1.3–1.7 ms through httpx (request building, the
connection pool, httpcore's state machine and the response object) against ~0.6 ms with h11 on a
plain Trio stream, while the sidecar's whole ``/execute`` of ``echo hi`` takes ~2.5 ms. Every other
call to a sidecar (files, ``/reset``, PTC) stays on httpx: only the run is on the answer's path.

A local sidecar serves one run at a time, so one connection per sidecar is enough. It is used only
while it is young (``max_idle`` seconds, far below the sidecar's own keep-alive timeout of 75 s), so a
request never meets a connection the sidecar is closing; anything else opens a new one.

Cancellation: cancelling ``post`` (the client left, the request's deadline) closes the connection,
exactly as httpcore does: that close is what tells the sidecar to kill the run's process tree. A
connection whose request did not complete cleanly is never reused. Errors are raised as the
``httpx`` exceptions ``SidecarSandbox`` already maps (connect, protocol, timeout), so the mapping to
``Unavailable`` / a failed ``RunResult`` stays in one place.
"""

from __future__ import annotations

import h11
import httpx
import trio

READ_SIZE = 65536


class SidecarWire:
    """A lazily opened, kept-alive connection to ``127.0.0.1:port`` (one request at a time)."""

    def __init__(self, port: int, *, max_idle: float = 20.0) -> None:
        self.port = port
        self.max_idle = max_idle
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        self._idle_since = 0.0
        self._busy = False
        self.connections = 0  # how many were opened (tests: reuse is real)

    def close(self) -> None:
        """Drop the connection (the next ``post`` opens a new one). Never blocks."""
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            stream.socket.close()

    async def _connect(self, timeout: float) -> None:
        self.close()
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to 127.0.0.1:{self.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"127.0.0.1:{self.port}: {exc.strerror or exc}") from None
        self._stream, self._conn = stream, h11.Connection(h11.CLIENT)
        self.connections += 1

    async def post(self, path: str, body: bytes, *, headers: list[tuple[str, str]], timeout: float,
                   connect_timeout: float = 5.0) -> httpx.Response:
        """``POST path`` with a JSON ``body``; the whole answer within ``timeout`` seconds."""
        if self._busy:
            raise RuntimeError("SidecarWire serves one request at a time")
        self._busy = True
        done = False
        try:
            if self._stream is None or trio.current_time() - self._idle_since > self.max_idle:
                await self._connect(connect_timeout)
            assert self._stream is not None and self._conn is not None
            conn, stream = self._conn, self._stream
            head = [(b"host", f"127.0.0.1:{self.port}".encode()), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *((k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers)]
            data = conn.send(h11.Request(method="POST", target=path, headers=head))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            try:
                with trio.fail_after(timeout):
                    await stream.send_all(data)
                    response = await self._read_response(conn, stream)
            except trio.TooSlowError:
                raise httpx.ReadTimeout(f"no answer within {timeout:g} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(f"connection to the sidecar broke: {exc}") from None
            except h11.ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"invalid HTTP from the sidecar: {exc}") from None
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self._idle_since = trio.current_time()
                done = True
            return response
        finally:
            self._busy = False
            if not done:
                self.close()  # cancelled or broken mid-request: the close tells the sidecar

    @staticmethod
    async def _read_response(conn: h11.Connection, stream: trio.SocketStream) -> httpx.Response:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_SIZE))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return httpx.Response(status, headers=headers, content=b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the sidecar closed the connection without an answer")
            # h11.InformationalResponse (100 Continue): nothing to do
