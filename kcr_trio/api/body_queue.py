"""The request body between Hypercorn and the handler, without copying it.

Quart-Trio's body queue (``TrioBody``) appends every piece Hypercorn received to one bytearray and
hands the handler ``bytes(...)`` of it: two copies of every body byte, plus a reallocation per
piece. On a 10 MB upload that was about a tenth of the server's busy CPU (py-spy: ``Body.append``
and ``Body.__anext__``). Here the pieces stay the ``bytes`` objects Hypercorn made and are handed
out one by one as they are (joining the ones that waited was a copy again, 3 % of the samples), so
the multipart parser gets views of them without a copy (``api/uploads.py``).

Same contract as Quart's ``Body``: iterate for pieces or await for the whole body; the
``max_content_length`` check on what waits unread; errors raised inside the handler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

__all__ = ["ChunkBody", "KcrRequest"]


class ChunkBody(TrioBody):
    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._chunks: deque[bytes] = deque()
        self._waiting = 0  # bytes received and not yet handed out

    async def __anext__(self) -> bytes:
        if self._must_raise is not None:
            raise self._must_raise
        if not self._complete.is_set():
            await self._has_data.wait()
        if self._complete.is_set() and not self._chunks:
            raise StopAsyncIteration()
        data = self._chunks.popleft()
        self._waiting -= len(data)
        if not self._chunks:
            self._has_data.clear()
        return data

    def __await__(self) -> Generator[Any, None, Any]:
        if self._must_raise is not None:
            raise self._must_raise
        yield from self._complete.wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        return b"".join(self._chunks)

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None:
            return
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._waiting += len(data)
        self._has_data.set()
        if self._max_content_length is not None and self._waiting > self._max_content_length:
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()

    def clear(self) -> None:
        self._chunks.clear()
        self._waiting = 0


class KcrRequest(TrioRequest):
    body_class = ChunkBody
