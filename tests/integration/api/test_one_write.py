"""``api.h11_head`` seen on the socket: a sized answer leaves the server in one write; a streamed one does not wait.

The server runs in-process on a real loopback socket (the executor is the in-process twin: this is
about the HTTP edge). What the server writes is recorded at its own sockets (``SocketStream.send_all``
of the connections whose local port is the server's), so the test sees the writes themselves, which
a client's reads could merge or split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from kcr_trio.backends.memory_executor import MemoryExecutor
from tests.integration.api.test_wire import Program, port_of, raw_request, read_timed, split_response
from tests.support.server import make_settings, running_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    writes: list[bytes] = []
    original = trio.SocketStream.send_all
    port = 0

    async def recording(self: trio.SocketStream, data: Any) -> None:
        if port and self.socket.getsockname()[1] == port:
            writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    executor = MemoryExecutor(Program(), capacity=2)
    settings = make_settings(tmp_path, kcr_heartbeat_grace=0.5, kcr_heartbeat_interval=1.0)
    async with running_server(settings, executor=executor) as url:
        port = port_of(url)
        yield port, writes


async def test_a_sized_answer_is_one_write_with_head_and_body(server) -> None:  # type: ignore[no-untyped-def]
    port, writes = server
    for method, path, body in (("GET", "/health", b""),
                               ("POST", "/exec", json.dumps({"code": "sleep:0", "lang": "py"}).encode()),
                               ("GET", "/no-such-route", b"")):
        writes.clear()
        stream = await raw_request(port, method, path, body, "Connection: close\r\n")
        raw = b"".join(c for _, c in await read_timed(stream, 5))
        status, headers, payload = split_response(raw)
        assert headers["content-length"] == str(len(payload)) and payload
        assert [w for w in writes if w] == [raw], (path, writes)  # one write: the whole answer
        if path == "/exec":
            assert json.loads(payload)["stdout"] == "done\n"


async def test_kept_alive_answers_are_one_write_each(server) -> None:  # type: ignore[no-untyped-def]
    port, writes = server
    stream = await raw_request(port, "GET", "/health")
    for i in range(3):
        if i:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(split_response(data)[2]) < int(split_response(data)[1]["content-length"]):
            data += await stream.receive_some()
        assert data.startswith(b"HTTP/1.1 200")
    await stream.aclose()
    answers = [w for w in writes if w]
    assert len(answers) == 3 and all(w.startswith(b"HTTP/1.1 200") and w.endswith(b"}") for w in answers)


async def test_a_streamed_answer_sends_its_head_at_once(server) -> None:  # type: ignore[no-untyped-def]
    port, writes = server
    writes.clear()
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "sleep:2.5", "lang": "py"}).encode(),
                               "Connection: close\r\n")
    chunks = await read_timed(stream, 10)
    status, headers, _ = split_response(b"".join(c for _, c in chunks))
    assert status.startswith("HTTP/1.1 200") and headers["transfer-encoding"] == "chunked"
    # The head of a committed (heartbeat) answer is a write of its own, before any body byte.
    first = next(w for w in writes if w)
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"\r\n\r\n")
