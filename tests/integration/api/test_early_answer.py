"""An answer given before the request body ended (413 while a too-large upload still arrives):
``Connection: close`` on it, and a lingering close, so every client reads its 413 instead of a
reset, and none reuses the doomed connection (``api/wire.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.ops import H, ops_server, port_of

pytestmark = pytest.mark.integration


def multipart(size: int) -> tuple[bytes, str]:
    body = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n' + b"\0" * size
            + b"\r\n--zz--\r\n")
    return body, "multipart/form-data; boundary=zz"


async def test_pooled_client_gets_every_413_and_keeps_working(tmp_path: Path) -> None:
    big = json.dumps({"code": "x", "lang": "py", "pad": "y" * (5 * 1024 * 1024)})
    upload, ctype = multipart(3 * 1024 * 1024)
    async with ops_server(tmp_path, max_file_size_mb=1) as (url, _, _), httpx.AsyncClient(timeout=30) as client:
        for _ in range(6):  # one pooled client: a reused doomed connection would fail the next request
            r = await client.post(url + "/exec", headers={**H, "Content-Type": "application/json"}, content=big)
            assert r.status_code == 413 and r.headers["connection"] == "close"
            r = await client.post(url + "/upload", headers={**H, "Content-Type": ctype}, content=upload)
            assert r.status_code == 413 and "exceeds maximum size of 1MB" in r.json()["error"]
            assert (await client.get(url + "/health")).status_code == 200


async def send_everything(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)  # the whole body, whatever the server says
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_raw_client_still_sending_reads_the_413(tmp_path: Path) -> None:
    upload, ctype = multipart(8 * 1024 * 1024)
    async with ops_server(tmp_path, max_file_size_mb=1) as (url, _, _):
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
            head = (f"POST /upload HTTP/1.1\r\nHost: t\r\nX-API-Key: {H['X-API-Key']}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(upload)}\r\n\r\n").encode()
            received = bytearray()
            # Send a part over the limit, and the rest once the answer is on its way (left unread
            # while we send on). Sending it all at once let a busy server read the whole body
            # before its parser saw 1 MB, and then rightly keep the connection (no close to see).
            cut = 2 * 1024 * 1024
            await stream.send_all(head + upload[:cut])
            with trio.fail_after(15):
                await trio.lowlevel.wait_readable(stream.socket)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_everything, stream, upload[cut:])
                with trio.fail_after(15):
                    while data := await stream.receive_some():
                        received += data
            await stream.aclose()
            status, _, rest = bytes(received).partition(b"\r\n")
            assert status.startswith(b"HTTP/1.1 413"), received[:200]
            assert b"connection: close" in rest.lower() and b"exceeds maximum size" in rest
