"""The sidecar server's fast path (``sidecar/httpfast.py``) against h11, over real sockets.

Every request is sent twice: to the server as it is, and to the same server with the fast path
switched off (``parse_head`` always declining: every request read and answered by h11, the server's
behaviour before the fast path existed). The bytes answered (``Date`` aside) and what the app saw
must be the same. Plain requests must not touch h11 at all; every unusual one must go to h11.
"""

from __future__ import annotations

import json
import re
from typing import Any

import h11
import pytest
import trio

import sidecar.httpd
from tests.integration.sidecar.test_httpd import serving

BODY = json.dumps({"code": "print('hi')", "timeout": 30}).encode()

PLAIN = {
    "hop-execute": b"POST /execute HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nx-request-id: req-1\r\n\r\n%s" % (len(BODY), BODY),
    "httpx-get": b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
                 b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.27.0\r\n\r\n",
    "empty-post": b"POST /reset HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "spaces-around-values": b"POST /p HTTP/1.1\r\nHost:x\r\nX-Pad: \t a  b \t\r\nContent-Length:  3 \r\n\r\nabc",
    "query-and-escapes": b"GET /a%20b/%2F?x=1&y=%2F HTTP/1.1\r\nHost: x\r\n\r\n",
}

UNUSUAL = {
    "chunked": b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "http-1.0": b"GET /old HTTP/1.0\r\n\r\n",
    "head": b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n",
    "put": b"PUT /u HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
    "obs-fold": b"GET /f HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n",
    "obs-text": b"GET /t HTTP/1.1\r\nHost: x\r\nX-A: caf\xe9\r\n\r\n",
    "connection-close": b"GET /cc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "two-lengths": b"POST /l HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "lengths-differ": b"POST /l HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "signed-length": b"POST /l HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "post-without-length": b"POST /n HTTP/1.1\r\nHost: x\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "bare-lf": b"GET /lf HTTP/1.1\nHost: x\n\n",
    "lower-case-method": b"get /m HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-target": b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "control-byte": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
}


def recording_app(seen: list[dict[str, Any]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        if scope["method"] != "GET":
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                body += msg["body"]
                if not msg.get("more_body"):
                    break
        keys = ("http_version", "method", "path", "raw_path", "query_string", "headers")
        seen.append({**{k: scope[k] for k in keys}, "body": body})
        out = json.dumps({"path": scope["path"], "body": body.decode("latin-1")}, ensure_ascii=False).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
            (b"x-request-id", b"r-1")]})
        await send({"type": "http.response.body", "body": out})
    return app


async def read_answer(stream: trio.SocketStream, head_only: bool = False) -> bytes:
    """One whole answer (or everything up to EOF if the server closes first)."""
    data = b""
    with trio.fail_after(10):
        while True:
            if (end := data.find(b"\r\n\r\n")) >= 0:
                m = re.search(rb"(?im)^content-length: *(\d+)", data[:end])
                if data[:end].startswith(b"HTTP/1.1 1"):  # an interim answer: keep reading
                    pass
                elif m and (head_only or len(data) >= end + 4 + int(m.group(1))):
                    return data
            chunk = await stream.receive_some(65536)
            if not chunk:
                return data
            data += chunk


def mask_date(data: bytes) -> bytes:
    return re.sub(rb"(?im)^date: [^\r\n]*", b"date: *", data)


async def exchange(request: bytes, *, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, list, int]:
    """Send ``request`` on a fresh connection; the answer, what the app saw, h11 event reads."""
    calls = [0]
    real_next_event = h11.Connection.next_event

    def counting(self: h11.Connection) -> Any:
        calls[0] += 1
        return real_next_event(self)

    with monkeypatch.context() as m:
        m.setattr(h11.Connection, "next_event", counting)
        if not fast:
            m.setattr(sidecar.httpd, "parse_head", lambda head: None)
        seen: list[dict[str, Any]] = []
        async with serving(recording_app(seen)) as srv:
            stream = await srv.connect()
            async with stream:
                try:
                    await stream.send_all(request)
                except trio.BrokenResourceError:
                    pass
                answer = await read_answer(stream, head_only=request.startswith(b"HEAD"))
    return mask_date(answer), seen, calls[0]


@pytest.mark.parametrize("name", list(PLAIN))
async def test_plain_requests_skip_h11_and_get_the_same_answer(name: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fast = await exchange(PLAIN[name], fast=True, monkeypatch=monkeypatch)
    slow = await exchange(PLAIN[name], fast=False, monkeypatch=monkeypatch)
    assert fast[2] == 0, "the plain request went through h11"
    assert slow[2] > 0
    assert fast[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert fast[0] == slow[0]
    assert fast[1] == slow[1] and len(fast[1]) == 1


@pytest.mark.parametrize("name", list(UNUSUAL))
async def test_unusual_requests_are_read_by_h11_as_before(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = await exchange(UNUSUAL[name], fast=True, monkeypatch=monkeypatch)
    slow = await exchange(UNUSUAL[name], fast=False, monkeypatch=monkeypatch)
    assert fast[2] > 0, "an unusual request skipped h11"
    assert fast[0] == slow[0] and fast[0].startswith(b"HTTP/1.")
    assert fast[1] == slow[1]


async def test_a_connection_moves_from_the_fast_path_to_h11_mid_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain, then chunked, then plain again, pipelined in one write: all answered, in order."""
    data = (PLAIN["empty-post"] + UNUSUAL["chunked"] + PLAIN["query-and-escapes"]
            + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    seen: list[dict[str, Any]] = []
    async with serving(recording_app(seen)) as srv:
        answer = await srv.send_and_read_to_eof(data)
    assert [s["path"] for s in seen] == ["/reset", "/c", "/a b//", "/last"]
    assert seen[1]["body"] == b"abc"
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 4


async def test_a_body_split_across_reads_is_handed_over_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    async with serving(recording_app(seen)) as srv:
        stream = await srv.connect()
        async with stream:
            body = b"x" * 200_000
            await stream.send_all(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            await stream.send_all(body[:1000])
            await stream.send_all(body[1000:])
            answer = await read_answer(stream)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            await stream.send_all(PLAIN["empty-post"])  # the connection is still usable
            assert (await read_answer(stream)).startswith(b"HTTP/1.1 200 OK\r\n")
    assert seen[0]["body"] == body and [s["path"] for s in seen] == ["/big", "/reset"]


async def test_an_answer_without_length_is_delimited_by_closing() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"part1 ", "more_body": True})
        await send({"type": "http.response.body", "body": b"part2"})

    async with serving(app) as srv:
        data = await srv.send_and_read_to_eof(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head and body == b"part1 part2"


async def test_an_answer_longer_than_its_length_is_an_app_error() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"too long"})

    async with serving(app, log=lambda event, **kw: None) as srv:
        data = await srv.send_and_read_to_eof(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500 ") and b"too long" not in data
