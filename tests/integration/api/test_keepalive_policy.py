"""Which answers close their connection (``api/connection_policy.py``), checked on the socket.

LibreChat's axios requests (its ``User-Agent: LibreChat/…``, or axios's own default headers) get
``Connection: close`` on the routes LibreChat fetches with axios, and the server really closes; every
other client keeps its connection on the same routes. The real axios + node-fetch sequence is in
``test_librechat_node.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.core.model import RunResult
from tests.support.server import TEST_KEY, make_settings, running_server

pytestmark = pytest.mark.integration

FILES = "/files/abcdefghijklmnopqrstu?detail=summary"
AXIOS_ACCEPT = "application/json, text/plain, */*"


async def _program(code: str, files: dict[str, bytes]) -> RunResult:
    return RunResult(0, "done", "")


async def read_response(stream: trio.SocketStream, buf: bytearray) -> tuple[str, dict[str, str], bytes]:
    """One Content-Length response from ``stream``; bytes past it stay in ``buf``."""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some()
            assert data, "connection closed before a response head"
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            data = await stream.receive_some()
            assert data, "connection closed inside a response body"
            rest += data
    buf[:] = rest[length:]
    return lines[0], headers, rest[:length]


async def closed_by_server(stream: trio.SocketStream, within: float = 2.5) -> bool:
    with trio.move_on_after(within):
        return await stream.receive_some() == b""
    return False


def request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\n{extra}\r\n".encode()


@pytest.fixture
async def port(tmp_path: Path):
    settings = make_settings(tmp_path)
    async with running_server(settings, executor=MemoryExecutor(_program, capacity=1)) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("extra", ["", "User-Agent: curl/8.5.0\r\n", "User-Agent: python-httpx/0.28\r\nAccept: */*\r\n"])
async def test_other_clients_keep_their_connection(port: int, extra: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buf = bytearray()
    for path in (FILES, "/download/abcdefghijklmnopqrstu/abcdefghijklmnopqrstu", FILES):
        await stream.send_all(request(path, extra))
        status, headers, _ = await read_response(stream, buf)
        assert status.split()[1] in ("200", "404"), status
        assert headers.get("connection", "") != "close", headers
    assert not await closed_by_server(stream, 0.5)  # still open: a fourth request could follow
    await stream.aclose()


@pytest.mark.parametrize("extra", [
    "User-Agent: LibreChat/1.0\r\n",
    "User-Agent: axios/1.13.6\r\nAccept: application/json\r\n",
    f"User-Agent: SomeNodeApp/2.0\r\nAccept: {AXIOS_ACCEPT}\r\n",
])
@pytest.mark.parametrize("path", [FILES, "/download/abcdefghijklmnopqrstu/abcdefghijklmnopqrstu",
                                  "/sessions/abcdefghijklmnopqrstu/objects/abcdefghijklmnopqrstu"])
async def test_librechat_and_axios_requests_are_closed(port: int, extra: str, path: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request(path, extra))
    _, headers, _ = await read_response(stream, bytearray())
    assert headers["connection"] == "close"
    assert await closed_by_server(stream), "the server left the socket open after Connection: close"


async def test_exec_keeps_librechats_connection(port: int) -> None:
    """Only the axios routes close: node-fetch's /exec (same User-Agent) keeps the pooled socket."""
    body = b'{"lang": "py", "code": "print(1)"}'
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nUser-Agent: LibreChat/1.0\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    status, headers, _ = await read_response(stream, bytearray())
    assert status.split()[1] == "200" and headers.get("connection", "") != "close"
    assert not await closed_by_server(stream, 0.5)
    await stream.aclose()


async def test_close_for_every_client_when_configured(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, kcr_connection_close_clients="all")
    async with running_server(settings, executor=MemoryExecutor(_program, capacity=1)) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await stream.send_all(request(FILES, "User-Agent: curl/8.5.0\r\n"))
        _, headers, _ = await read_response(stream, bytearray())
        assert headers["connection"] == "close"
        assert await closed_by_server(stream)


async def test_cure_off_keeps_every_connection(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, kcr_connection_close=False)
    async with running_server(settings, executor=MemoryExecutor(_program, capacity=1)) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await stream.send_all(request(FILES, "User-Agent: LibreChat/1.0\r\n"))
        _, headers, _ = await read_response(stream, bytearray())
        assert headers.get("connection", "") != "close"
        await stream.aclose()
