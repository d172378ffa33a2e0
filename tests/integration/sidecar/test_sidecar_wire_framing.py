"""``SidecarWire`` reads a plain sized answer by hand and hands everything else to h11.

A real TCP server on loopback answers each request with bytes chosen by the test, so every framing
the hop may meet is exercised over a real socket: the plain answer (read without h11, connection
kept), and the ones h11 must read (chunked, informational first, HTTP/1.0, ``Connection: close``,
bytes beyond the answer), after which the connection is not reused. The request's bytes are checked
too: what h11 would have sent, header values validated as h11 validates them.
"""

from __future__ import annotations

import json

import h11
import httpx
import pytest
import trio

from kcr_trio.backends.local_executor import open_local_executor
from kcr_trio.backends.sidecar_client import _execute_body
from kcr_trio.backends.sidecar_wire import SidecarWire
from tests.integration.sidecar.test_local_executor import data_dir, make_settings  # noqa: F401

OK = b'{"ok":true}'
PLAIN = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n" + OK


class Server:
    """Answers the n-th request on any connection with ``answers[n]``; records requests and
    how many connections it accepted."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.accepted = 0
        self.port = 0
        self.closed = trio.Event()  # a connection ended (the client closed it)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.port = listener.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                self.accepted += 1
                nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = await conn.recv(65536)
                    if not more:
                        self.closed.set()
                        return
                    data += more
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += await conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                data = rest[length:]
                await trio.SocketStream(conn).send_all(self.answers[len(self.requests) - 1])


async def exchange(answers: list[bytes], headers: list[tuple[str, str]] | None = None
                   ) -> tuple[Server, SidecarWire, list[tuple[int, bytes]]]:
    server = Server(answers)
    got = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        wire = SidecarWire(server.port)
        for _ in answers:
            resp = await wire.post("/execute", b'{"code": "x"}', headers=headers or [], timeout=5)
            got.append((resp.status_code, resp.content))
        nursery.cancel_scope.cancel()
    return server, wire, got


async def test_plain_sized_answers_share_one_connection() -> None:
    server, wire, got = await exchange([PLAIN, PLAIN, PLAIN])
    assert got == [(200, OK)] * 3
    assert server.accepted == 1 and wire.connections == 1 and wire._stream is not None


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
    b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nhello world",
    b"HTTP/1.1 200 OK\r\nContent-Length:   11  \r\nX-Folded: a\r\n b\r\n\r\nhello world",
])
async def test_other_framings_are_read_by_h11_and_the_connection_is_replaced(answer: bytes) -> None:
    server, wire, got = await exchange([answer, PLAIN])
    assert got[0] == (200, b"hello world")
    assert got[1] == (200, OK)
    assert server.accepted == 2 and wire.connections == 2


async def test_bytes_beyond_the_answer_drop_the_connection() -> None:
    server, wire, got = await exchange([PLAIN + b"HTTP/1.1 200 OK\r\n", PLAIN])
    assert got == [(200, OK)] * 2
    assert server.accepted == 2


async def test_an_error_status_is_returned_with_its_body() -> None:
    answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
    _, _, got = await exchange([answer])
    assert got == [(503, b"busy")]


async def test_the_request_is_what_h11_would_send() -> None:
    server, _, _ = await exchange([PLAIN], headers=[("x-request-id", "req-1")])
    (raw,) = server.requests
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert request.method == b"POST" and request.target == b"/execute"
    fields = dict(request.headers)
    assert fields[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert fields[b"content-type"] == b"application/json"
    assert fields[b"x-request-id"] == b"req-1"
    body = conn.next_event()
    assert isinstance(body, h11.Data) and bytes(body.data) == b'{"code": "x"}'
    assert isinstance(conn.next_event(), h11.EndOfMessage)


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "trailing ", "nul\x00"])
async def test_an_invalid_header_value_is_refused_as_h11_refuses_it(value: str) -> None:
    with pytest.raises(h11.LocalProtocolError):  # h11 itself refuses it
        h11.Connection(h11.CLIENT).send(h11.Request(method="POST", target="/", headers=[
            ("host", "x"), ("x-request-id", value)]))
    with pytest.raises(h11.LocalProtocolError):
        SidecarWire(1)._request("/execute", b"{}", [("x-request-id", value)])


async def test_a_garbled_status_line_after_a_good_start_is_a_protocol_error() -> None:
    server = Server([b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n"])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        wire = SidecarWire(server.port)
        with pytest.raises(httpx.RemoteProtocolError):
            await wire.post("/execute", b"{}", headers=[], timeout=5)
        assert wire._stream is None
        nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_sends_nothing_and_drops_the_connection() -> None:
    server = Server([PLAIN, PLAIN])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        wire = SidecarWire(server.port)
        await wire.post("/execute", b"{}", headers=[], timeout=5)  # the connection is open now
        with trio.CancelScope() as scope:
            scope.cancel()
            await wire.post("/execute", b"{}", headers=[], timeout=5)
        assert scope.cancelled_caught and wire._stream is None
        with trio.fail_after(5):
            await server.closed.wait()
        assert len(server.requests) == 1  # the cancelled request never reached the server
        nursery.cancel_scope.cancel()


async def test_a_cancelled_caller_takes_no_slot_and_no_sidecar(data_dir: str) -> None:  # noqa: F811
    async with open_local_executor(make_settings(data_dir, pod_pool_py=0)) as ex:
        with trio.CancelScope() as scope:
            scope.cancel()
            async with ex.sandbox("py", wait=5):
                raise AssertionError("a cancelled caller got a sandbox")
        assert scope.cancelled_caught
        assert ex.in_use == 0 and not ex._live


@pytest.mark.parametrize("args", [[], ["a", 'b"c', "\u00e9\u2028", "\x00"]])
def test_the_execute_body_is_json_dumps_byte_for_byte(args: list[str]) -> None:
    code = 'print("hi \u00e9 \U0001f600")\n\tx = "\\\\"'
    body: dict[str, object] = {"code": code, "timeout": 7, "request_id": "r-1"}
    if args:
        body["args"] = list(args)
    assert _execute_body(code, 7, "r-1", args) == json.dumps(body).encode()
