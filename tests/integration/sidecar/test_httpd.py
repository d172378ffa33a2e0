"""The sidecar's own HTTP/1.1 server (``sidecar/httpd.py``) over real sockets, byte for byte.

The apps here are tiny ASGI callables; what is under test is the server: keep-alive, pipelining,
``Expect: 100-continue``, chunked bodies, HEAD, malformed input, disconnect detection, idle timeout
and graceful shutdown. The sidecar's own endpoints are covered by the other files in this folder.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio

from sidecar.httpd import Server
from tests.support.sidecar import read_to_eof


async def echo_app(scope: dict, receive: Any, send: Any) -> None:
    """Answers with the method, path, query and the request body it read."""
    body = b""
    if scope["method"] in ("POST", "PUT"):
        while True:
            msg = await receive()
            assert msg["type"] == "http.request"
            body += msg["body"]
            if not msg.get("more_body"):
                break
    out = b"%s %s ?%s body=%s" % (scope["method"].encode(), scope["path"].encode(),
                                  scope["query_string"], body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


class Running:
    def __init__(self, server: Server, port: int, shutdown: trio.Event, done: trio.Event) -> None:
        self.server, self.port, self.shutdown, self.done = server, port, shutdown, done

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def send_and_read_to_eof(self, data: bytes) -> bytes:
        """One connection: send ``data``, return everything the server writes before it closes."""
        stream = await self.connect()
        async with stream:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:  # the server may answer and close before we finish
                pass
            return await read_to_eof(stream)


@asynccontextmanager
async def serving(app: Any, **kwargs: Any) -> AsyncIterator[Running]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = Server(app, **kwargs)
    shutdown, done = trio.Event(), trio.Event()

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        try:
            await server.serve(sock, shutdown, task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        try:
            yield Running(server, sock.getsockname()[1], shutdown, done)
        finally:
            shutdown.set()
            with trio.fail_after(10):
                await done.wait()


class Reader:
    """Parses responses off a raw stream with h11 as a client would."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def event(self) -> Any:
        with trio.fail_after(10):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                self.h11.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.event(), h11.EndOfMessage):
            body += event.data
        return head, body

    def next_cycle(self, method: bytes = b"GET", target: bytes = b"/") -> None:
        """Tell the client-side h11 about the request we sent by hand, so it can parse the answer."""
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        self.h11.send(h11.Request(method=method, target=target, headers=[(b"host", b"x")]))
        self.h11.send(h11.EndOfMessage())


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serving(echo_app) as srv:
        stream = await srv.connect()
        async with stream:
            reader = Reader(stream)
            for i in range(3):
                await stream.send_all(b"GET /a%%20b?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                reader.next_cycle()
                head, body = await reader.response()
                assert head.status_code == 200
                assert body == b"GET /a b ?n=%d body=" % i  # path is decoded, query is raw
                assert dict(head.headers)[b"date"]


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving(echo_app) as srv:
        data = await srv.send_and_read_to_eof(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.index(b"GET /one") < data.index(b"POST /two ? body=abc") < data.index(b"GET /three")
    assert data.count(b"HTTP/1.1 200") == 3


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async with serving(echo_app) as srv:
        stream = await srv.connect()
        async with stream:
            await stream.send_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                  b"Expect: 100-continue\r\n\r\n")
            # the body is withheld until the server says go on; if it never does, this times out
            got = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in got:
                    got += await stream.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            rest = got.split(b"\r\n\r\n", 1)[1]
            with trio.fail_after(10):
                while b"body=hello" not in rest:
                    rest += await stream.receive_some(65536)
            assert rest.startswith(b"HTTP/1.1 200 ")


async def test_chunked_request_body() -> None:
    async with serving(echo_app) as srv:
        data = await srv.send_and_read_to_eof(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"body=abcdefg")


async def test_head_has_headers_but_no_body_and_keeps_the_connection() -> None:
    async with serving(echo_app) as srv:
        stream = await srv.connect()
        async with stream:
            reader = Reader(stream)
            await stream.send_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            reader.next_cycle(b"HEAD", b"/h")
            head, body = await reader.response()
            assert head.status_code == 200 and body == b""
            assert dict(head.headers)[b"content-length"] == str(len(b"HEAD /h ? body=")).encode()
            await stream.send_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            reader.next_cycle()
            assert (await reader.response())[1] == b"GET /after ? body="


async def answer_without_reading(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_body_the_app_did_not_read_is_drained_and_the_connection_kept() -> None:
    """Like a multipart parser that stops at its closing boundary: the answer goes out before the
    chunked terminator arrives. The connection must survive for the next request."""
    async with serving(answer_without_reading) as srv:
        stream = await srv.connect()
        async with stream:
            reader = Reader(stream)
            await stream.send_all(b"POST /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n")
            reader.h11.send(h11.Request(method=b"POST", target=b"/files",
                                        headers=[(b"host", b"x"), (b"transfer-encoding", b"chunked")]))
            head, body = await reader.response()  # answered while the body is still open
            assert head.status_code == 200 and body == b"ok"
            await stream.send_all(b"5\r\nworld\r\n0\r\n\r\n" b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            reader.h11.send(h11.EndOfMessage())
            reader.next_cycle()
            head, body = await reader.response()
            assert head.status_code == 200 and body == b"ok"


async def test_an_unread_body_past_the_drain_limit_closes_the_connection() -> None:
    async with serving(answer_without_reading, max_drain_size=1000) as srv:
        data = await srv.send_and_read_to_eof(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok")


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
], ids=["garbage", "no-host", "bad-length", "huge-head"])
async def test_malformed_requests_are_rejected_without_reaching_the_app(request_bytes: bytes,
                                                                         status: int) -> None:
    calls: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        calls.append(scope)
        await echo_app(scope, receive, send)

    async with serving(app, max_head_size=64 * 1024) as srv:
        data = await srv.send_and_read_to_eof(request_bytes)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b'{"detail": "Bad request' in data
    assert calls == []


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "after-start"])
async def test_app_errors_are_500_and_logged(started: bool) -> None:
    """Also when the app had begun its answer: the head only goes out with the first body bytes."""
    logged: list[tuple[str, dict]] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("boom")

    async with serving(app, log=lambda event, **kw: logged.append((event, kw))) as srv:
        # returns only because the connection is dropped after a 500
        data = await srv.send_and_read_to_eof(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500 ") and data.endswith(b'{"detail": "Internal Server Error"}')
    assert [event for event, _ in logged] == ["http_app_error"]
    assert "ValueError: boom" in logged[0][1]["error"]


async def test_disconnect_is_reported_once_the_caller_goes_away() -> None:
    """This is what cancels a run when its caller leaves: receive() after the body waits for EOF."""
    got_body, disconnected = trio.Event(), trio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b"x"
        got_body.set()
        assert (await receive())["type"] == "http.disconnect"
        disconnected.set()

    async with serving(app) as srv:
        stream = await srv.connect()
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        with trio.fail_after(10):
            await got_body.wait()
        assert not disconnected.is_set()
        await stream.aclose()
        with trio.fail_after(10):
            await disconnected.wait()


async def test_idle_connections_close_after_the_keep_alive_timeout() -> None:
    async with serving(echo_app, keep_alive_timeout=0.2) as srv:
        # returns only because the server closes the idle socket
        data = await srv.send_and_read_to_eof(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"GET / ? body=")


async def test_shutdown_closes_idle_connections_and_lets_a_request_in_flight_finish() -> None:
    release, started = trio.Event(), trio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            started.set()
            await release.wait()
        await echo_app(scope, receive, send)

    async with serving(app, graceful_timeout=10) as srv:
        idle = await srv.connect()
        reader = Reader(idle)
        await idle.send_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        reader.next_cycle()
        await reader.response()  # now idle, waiting for its next request
        busy = await srv.connect()
        await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            await started.wait()
        srv.shutdown.set()
        assert await read_to_eof(idle) == b""  # closed at once, with nothing more sent
        assert not srv.done.is_set()  # the slow request holds the server open
        release.set()
        data = await read_to_eof(busy)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"GET /slow ? body=")
        with trio.fail_after(10):
            await srv.done.wait()
        with pytest.raises(OSError):
            await srv.connect()  # the listener is closed
        await idle.aclose()
        await busy.aclose()


async def test_shutdown_cancels_a_request_that_outlives_the_grace_period() -> None:
    cancelled, started = trio.Event(), trio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with serving(app, graceful_timeout=0.1) as srv:
        stream = await srv.connect()
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(10):
                await started.wait()
            srv.shutdown.set()
            with trio.fail_after(10):
                await srv.done.wait()
            assert cancelled.is_set()
            assert await read_to_eof(stream) == b""
