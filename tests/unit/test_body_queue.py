"""The request body queue (``api/body_queue.py``): Quart's contract, without copying the pieces."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from werkzeug.exceptions import RequestEntityTooLarge

from kcr_trio.api.body_queue import ChunkBody


async def test_a_piece_is_handed_out_as_received() -> None:
    body = ChunkBody(None, None)
    piece = b"x" * 100_000
    body.append(piece)
    assert await body.__anext__() is piece  # the same object: no copy on the way


async def test_pieces_that_waited_come_one_by_one_in_order_and_the_end_is_seen() -> None:
    body = ChunkBody(None, None)
    body.append(b"ab")
    body.append(b"")
    body.append(bytearray(b"cd"))
    body.set_complete()
    assert [piece async for piece in body] == [b"ab", b"cd"]


async def test_iteration_waits_for_pieces_as_they_arrive() -> None:
    body = ChunkBody(None, None)
    got: list[bytes] = []

    async def consume() -> None:
        async for piece in body:
            got.append(piece)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for piece in (b"one", b"two"):
            await trio.testing.wait_all_tasks_blocked()
            body.append(piece)
        await trio.testing.wait_all_tasks_blocked()
        body.set_complete()
    assert got == [b"one", b"two"]


async def test_awaiting_gives_the_whole_body() -> None:
    body = ChunkBody(None, None)
    body.append(b"he")
    body.append(b"llo")
    body.set_complete()
    assert await body == b"hello"


async def test_too_much_waiting_unread_is_refused_inside_the_handler() -> None:
    body = ChunkBody(None, 4)
    body.append(b"abc")
    body.append(b"de")
    with pytest.raises(RequestEntityTooLarge):
        await body.__anext__()
    announced = ChunkBody(10, 4)  # a Content-Length over the limit is refused before any byte
    with pytest.raises(RequestEntityTooLarge):
        await announced
