"""The keep-alive idle watcher (``api/wire.py``, one per connection, its deadline moved per request
instead of a task restarted): a request that lasts longer than the keep-alive timeout is never cut,
the same connection serves the next request, and once idle again the connection is still closed.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.support.ops import ops_server, port_of, raw
from tests.support.server import TEST_KEY


async def read_one(stream: trio.SocketStream, limit: float) -> bytes:
    """One ``Content-Length`` answer (head and body) from ``stream``."""
    data = b""
    with trio.fail_after(limit):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += await stream.receive_some()
    return head + b"\r\n\r\n" + body


async def test_busy_longer_than_keep_alive_then_reused_then_closed_when_idle(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_keep_alive_timeout=6.0, kcr_head_timeout=0.5,
                          kcr_heartbeat_grace=30.0) as (url, _, _):
        body = json.dumps({"code": "sleep:6.5", "lang": "py"}).encode()
        stream = await raw(
            port_of(url),
            f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
        )
        first = await read_one(stream, 20)  # busy longer than the 6 s keep-alive timeout
        assert first.startswith(b"HTTP/1.1 200"), first
        assert json.loads(first.partition(b"\r\n\r\n")[2])["stdout"].strip() == "done"
        for _ in range(3):  # the same connection, re-armed after each answer
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_one(stream, 10)).startswith(b"HTTP/1.1 200")
        with trio.fail_after(15):  # idle again: the server closes it
            while await stream.receive_some():
                pass
        await stream.aclose()
