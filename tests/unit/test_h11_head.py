"""``api/h11_head.py``: the head of a small fixed-length answer leaves with its body in one write;
every other answer is written as Hypercorn writes it. Driven through Hypercorn's own H11Protocol
method on a real h11 connection; ``send`` records the writes."""

from __future__ import annotations

from typing import Any

import h11
import pytest
import trio
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

from kcr_trio.api.h11_head import MAX_HELD_BODY, install_coalesced_head


class Conn:
    """What ``_send_h11_event`` uses of an H11Protocol: its h11 connection and its ``send``."""

    def __init__(self, method: bytes = b"GET") -> None:
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(method + b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        self.connection.next_event()
        self.writes: list[bytes] = []

    async def send(self, event: Any) -> None:
        assert isinstance(event, RawData)
        self.writes.append(event.data)

    async def emit(self, *events: Any) -> list[bytes]:
        for event in events:
            await H11Protocol._send_h11_event(self, event)  # type: ignore[arg-type]
        return self.writes


def response(length: int | None) -> h11.Response:
    headers = [("content-type", "application/json")]
    if length is not None:
        headers.append(("content-length", str(length)))
    return h11.Response(status_code=200, headers=headers)


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    install_coalesced_head()
    install_coalesced_head()  # idempotent


async def test_small_answer_is_one_write() -> None:
    writes = await Conn().emit(response(2), h11.Data(data=b"[]"), h11.EndOfMessage())
    assert len(writes[0]) > 2 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"\r\n\r\n[]")
    assert writes[1:] == [b""]  # EndOfMessage of a Content-Length body: nothing more on the wire


async def test_head_only_answers_flush_the_head_first() -> None:
    writes = await Conn(b"HEAD").emit(response(2), h11.EndOfMessage())
    assert writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"\r\n\r\n") and writes[1:] == [b""]


@pytest.mark.parametrize("length", [None, MAX_HELD_BODY + 1])
async def test_streams_and_large_answers_send_the_head_at_once(length: int | None) -> None:
    conn = Conn()
    await conn.emit(response(length))
    assert len(conn.writes) == 1 and conn.writes[0].endswith(b"\r\n\r\n")  # before any body exists
    await conn.emit(h11.Data(data=b" "))
    assert len(conn.writes) == 2 and b" " in conn.writes[1]  # (chunked without a Content-Length)


async def test_bytes_and_order_are_unchanged() -> None:
    plain = h11.Connection(h11.SERVER)
    plain.receive_data(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    plain.next_event(), plain.next_event()
    events = [response(5), h11.Data(data=b"ab"), h11.Data(data=b"cde"), h11.EndOfMessage()]
    expected = b"".join(plain.send(e) or b"" for e in events)
    writes = await Conn().emit(*events)
    assert b"".join(writes) == expected and len(writes) == 3
    await trio.lowlevel.checkpoint()
