"""Raw HTTP/1.1 over a trio stream, for what client libraries hide: leaving mid-response at an exact
moment (disconnect storm), idling on a kept-alive socket, trickling a request body (slow clients)."""

from __future__ import annotations

import ssl

import trio

from kcr_trio.bench.targets import Target


async def open_stream(target: Target, timeout: float = 10.0) -> trio.abc.Stream:
    with trio.fail_after(timeout):
        if target.tls:
            return await trio.open_ssl_over_tcp_stream(target.host, target.port, ssl_context=ssl.create_default_context())
        return await trio.open_tcp_stream(target.host, target.port)


def request_head(target: Target, method: str, path: str, *, length: int | None = None,
                 content_type: str | None = None, close: bool = False) -> bytes:
    lines = [f"{method} {target.prefix}{path} HTTP/1.1", f"Host: {target.host}:{target.port}",
             "User-Agent: kcr-trio-bench"]
    lines += [f"{k}: {v}" for k, v in target.headers.items()]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response_head(stream: trio.abc.Stream, limit: int = 65536) -> tuple[int, dict[str, str], bytes]:
    """Read until the end of the head; (status, headers, bytes of body already received)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError("connection closed before the response head")
        buf += data
        if len(buf) > limit:
            raise ValueError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, rest


async def read_full_response(stream: trio.abc.Stream) -> tuple[int, dict[str, str], bytes]:
    """A complete response with Content-Length or chunked body (enough for /health and /exec)."""
    status, headers, body = await read_response_head(stream)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                break
            body += data
        return status, headers, body
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = await stream.receive_some(65536)
        if not data:
            break
        body += data
    return status, headers, body
