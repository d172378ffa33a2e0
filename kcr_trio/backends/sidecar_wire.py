"""One kept-alive HTTP/1.1 connection to one local sidecar, for the run's ``POST /execute`` (and the
release's ``POST /reset``).

Why not the executor's shared ``httpx.AsyncClient`` for these calls: measured at c=1 with a trivial
program, the hop server → sidecar → server cost ~1.3–1.7 ms through httpx (request building, the
connection pool, httpcore's state machine and the response object) against ~0.6 ms with h11 on a
plain Trio stream, while the sidecar's whole ``/execute`` of ``echo hi`` takes ~2.5 ms. Every other
call to a sidecar (files, PTC) stays on httpx: only the run is on the answer's path.

Why not h11 either, for the common answer: at a low request rate the server's Python runs with cold
caches (~3× a hot loop), so what counts is how much of it runs per ``/exec``. h11 cost ~190 calls
per run (request validation, its state machine, header normalisation), and each Trio socket call
one more pass of the scheduler after it succeeded. So the request's bytes are written directly
(the header values checked as h11 checks them), the socket is a plain non-blocking one waited on
with ``trio.lowlevel.wait_readable``/``wait_writable``, and an answer that is a plain sized one
(``HTTP/1.1``, a final status, ``Content-Length``, no ``Transfer-Encoding``; what the sidecar
sends) is split by hand. Anything else (chunked, informational, a cut or garbled answer, the
connection closed) is handed, with every byte received so far, to h11 (``kcr_trio.http1``), which
reads it or raises exactly as before; such a connection is not reused.

A local sidecar serves one run at a time, so one connection per sidecar is enough. It is used only
while it is young (``max_idle`` seconds, 15 s below the sidecar's own keep-alive timeout of 75 s in
``sidecar/server.py``), so a request never meets a connection the sidecar is closing; anything else
opens a new one. Why 60 s and not less: a new connection costs the run ~0.4–0.5 ms (connect, the
sidecar's accept), and the pool hands out its sidecars in turn, so at a human's pace (a run every
10–20 s, two or three warm sidecars) each connection sits idle 20–60 s between its runs.

Cancellation: cancelling ``post`` (the client left, the request's deadline) closes the connection,
exactly as httpcore does: that close is what tells the sidecar to kill the run's process tree. A
connection whose request did not complete cleanly is never reused. Errors are raised as the
``httpx`` exceptions ``SidecarSandbox`` already maps (connect, protocol, timeout), so the mapping to
``Unavailable`` / a failed ``RunResult`` stays in one place.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import h11
import httpx
import trio

from kcr_trio.http1 import read_response

READ_SIZE = 65536
MAX_HEAD = 16384  # a longer head goes to h11, which enforces its own limit
# RFC 7230 field-value (what h11 accepts in a request header), and a header name (token).
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")


@dataclass(frozen=True, slots=True)
class WireResponse:
    """A complete answer: its status, headers (names lower-cased) and body."""

    status_code: int
    headers: list[tuple[bytes, bytes]]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class _Unusual(Exception):
    """The answer is not a plain sized one: h11 reads it (``_read_with_h11``)."""


class SidecarWire:
    """A lazily opened, kept-alive connection to ``127.0.0.1:port`` (one request at a time)."""

    def __init__(self, port: int, *, max_idle: float = 60.0) -> None:
        self.port = port
        self.max_idle = max_idle
        self._stream: socket.socket | None = None  # non-blocking, connected; None: closed
        self._idle_since = 0.0
        self._busy = False
        self._host = b"host: 127.0.0.1:%d\r\n" % port
        self.connections = 0  # how many were opened (tests: reuse is real)

    def close(self) -> None:
        """Drop the connection (the next ``post`` opens a new one). Never blocks."""
        sock, self._stream = self._stream, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)  # a task waiting on it wakes with an error
            sock.close()

    async def _connect(self, timeout: float) -> socket.socket:
        self.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                with trio.fail_after(timeout):
                    await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
        except trio.TooSlowError:
            _discard(sock)
            raise httpx.ConnectTimeout(f"connecting to 127.0.0.1:{self.port} timed out") from None
        except OSError as exc:
            _discard(sock)
            raise httpx.ConnectError(f"127.0.0.1:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            _discard(sock)
            raise
        self._stream = sock
        self.connections += 1
        return sock

    async def post(self, path: str, body: bytes, *, headers: list[tuple[str, str]], timeout: float,
                   connect_timeout: float = 5.0) -> WireResponse:
        """``POST path`` with a JSON ``body``; the whole answer within ``timeout`` seconds."""
        if self._busy:
            raise RuntimeError("SidecarWire serves one request at a time")
        self._busy = True
        done = False
        try:
            sock = self._stream
            if sock is None or trio.current_time() - self._idle_since > self.max_idle:
                sock = await self._connect(connect_timeout)
            data = self._request(path, body, headers)
            try:
                # A bare scope, not ``fail_after`` (a generator context manager around the same).
                with trio.CancelScope(deadline=trio.current_time() + timeout) as waited:
                    # As Trio's own ``send`` does: a request cancelled already is never sent (the
                    # sidecar would start the program only to be told to kill it).
                    await trio.lowlevel.checkpoint_if_cancelled()
                    await _send_all(sock, data)
                    try:
                        response, reusable = await self._read(sock)
                    except _Unusual as unusual:
                        response, reusable = await self._read_with_h11(sock, path, body, headers, unusual.args[0])
                if waited.cancelled_caught:
                    raise httpx.ReadTimeout(f"no answer within {timeout:g} s")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(f"connection to the sidecar broke: {exc}") from None
            except h11.ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"invalid HTTP from the sidecar: {exc}") from None
            if reusable:
                self._idle_since = trio.current_time()
                done = True
            return response
        finally:
            self._busy = False
            if not done:
                self.close()  # cancelled, broken or not reusable: the close tells the sidecar

    def _request(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> bytes:
        """The request's bytes. Header values are checked as h11 checks them (an invalid one
        raises ``h11.LocalProtocolError``, as it did when h11 built the request)."""
        extra = b""
        for name, value in headers:
            k, v = name.encode("latin-1"), value.encode("latin-1", "replace")
            if not _NAME.fullmatch(k) or not _VALUE.fullmatch(v):
                raise h11.LocalProtocolError(f"illegal header {name!r}")
            extra += k + b": " + v + b"\r\n"
        return (b"POST %s HTTP/1.1\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                % (path.encode("ascii"), self._host, len(body), extra, body))

    async def _read(self, sock: socket.socket) -> tuple[WireResponse, bool]:
        """A plain sized answer, and whether the connection may carry the next request;
        ``_Unusual`` (carrying the bytes read) for anything else."""
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            more = await _receive(sock, first=not buf)
            if not more or len(buf) > MAX_HEAD:
                raise _Unusual(buf + more)
            buf += more
        lines = buf[:end].split(b"\r\n")
        line = lines[0]
        if not line.startswith(b"HTTP/1.1 ") or not line[9:12].isdigit() or line[12:13] not in (b" ", b""):
            raise _Unusual(buf)
        status = int(line[9:12])
        if status < 200 or status in (204, 304):
            raise _Unusual(buf)
        length = -1
        close = False
        headers = []
        for field in lines[1:]:
            name, colon, value = field.partition(b":")
            if not colon or not _NAME.fullmatch(name):
                raise _Unusual(buf)  # obsolete line folding, a missing colon, a bad name
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                if length >= 0 or not value.isdigit():
                    raise _Unusual(buf)
                length = int(value)
            elif name == b"transfer-encoding":
                raise _Unusual(buf)
            elif name == b"connection":
                close = b"close" in value.lower()
            headers.append((name, value))
        if length < 0:
            raise _Unusual(buf)
        need = end + 4 + length
        while len(buf) < need:
            more = await _receive(sock, first=False)
            if not more:
                raise _Unusual(buf)  # cut short: h11 says so
            buf += more
        # Bytes beyond the answer (none expected): the connection's framing is in doubt.
        return WireResponse(status, headers, buf[end + 4:need]), not close and len(buf) == need

    async def _read_with_h11(self, sock: socket.socket, path: str, body: bytes,
                             headers: list[tuple[str, str]], received: bytes) -> tuple[WireResponse, bool]:
        """Everything but a plain sized answer, read by h11 from the start (its errors raise
        as before). The connection is not reused afterwards."""
        conn = h11.Connection(h11.CLIENT)
        head = [(b"host", b"127.0.0.1:%d" % self.port), (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *((k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers)]
        conn.send(h11.Request(method="POST", target=path, headers=head))
        conn.send(h11.Data(data=body))
        conn.send(h11.EndOfMessage())
        conn.receive_data(received)  # b"" only when the sidecar closed at once: h11 sees the end

        async def receive() -> bytes:
            return await _receive(sock, first=False)

        status, response_headers, content = await read_response(
            conn, receive, closed="the sidecar closed the connection without an answer")
        return WireResponse(status, response_headers, content), False


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data``: at once when the socket takes it (no scheduler pass), else as it drains."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _receive(sock: socket.socket, *, first: bool) -> bytes:
    """The next bytes (``b""``: the peer closed). ``first``: nothing can have arrived yet (the
    request was just sent), so wait before the first ``recv``."""
    if first:
        await trio.lowlevel.wait_readable(sock)
    while True:
        try:
            return sock.recv(READ_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


def _discard(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()
