"""The access line's outcome (api/scope.py), driven by a scripted ASGI exchange: the order of a
client's disconnect and the framework's closing empty chunk is forced here, where over real sockets
it is a race (tests/integration/ops/test_accounting.py covers the real thing)."""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from kcr_trio.api.scope import RequestScopeMiddleware


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("127.0.0.1", 1)}


async def exchange(chunks: list[bytes], length: int | None) -> dict[str, Any]:
    """The app sends ``chunks`` (more_body=True), then the client leaves, then the closing chunk."""
    disconnected = trio.Event()
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        disconnected.set()
        with trio.move_on_after(1):  # a withheld disconnect never comes
            await receive()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def receive() -> dict[str, Any]:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()  # as a real transport's send: cancellation lands here
        sent.append(message)

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("kcr_trio.access")
    access.addHandler(handler)
    old = access.level
    access.setLevel(logging.INFO)
    try:
        await RequestScopeMiddleware(app)(scope(), receive, send)
    finally:
        access.removeHandler(handler)
        access.setLevel(old)
    (line,) = records
    result: dict[str, Any] = json.loads(line)
    return result


async def test_all_promised_bytes_sent_then_disconnect_is_ok() -> None:
    line = await exchange([b"hello", b" world"], length=11)
    assert line["outcome"] == "ok" and line["bytes_out"] == 11 and "client_gone_after_s" not in line


async def test_disconnect_before_the_last_byte_is_client_gone() -> None:
    line = await exchange([b"hello"], length=11)
    assert line["outcome"] == "client_gone" and line["bytes_out"] == 5 and "client_gone_after_s" in line


async def test_chunked_answer_is_complete_only_with_its_closing_chunk() -> None:
    line = await exchange([b"hello"], length=None)  # no Content-Length: the terminator is the last byte
    assert line["outcome"] == "client_gone"
