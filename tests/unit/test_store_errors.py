"""The one error-mapping helper of the asyncio bridge (``StoreErrors``), which both the Redis and
the S3 store use: what each kind of failure becomes, and the deadline."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kcr_trio.backends.aio_bridge import BridgeClosed, BridgeMissing, StoreErrors, open_bridge
from kcr_trio.core.errors import NotFound, Unavailable

ERRORS = StoreErrors("Thing store", "Peer", logging.getLogger("test.store_errors"))


class LibraryError(Exception):
    pass


def translate(exc: Exception) -> Exception | None:
    return ERRORS.unavailable("peer said no") if isinstance(exc, LibraryError) else None


def test_library_errors_become_the_translated_core_error() -> None:
    with pytest.raises(Unavailable) as info, ERRORS.map_exceptions(translate):
        raise LibraryError("boom")
    assert info.value.message == "Thing store unavailable: peer said no"
    assert info.value.headers == {"Retry-After": "2"}
    assert isinstance(info.value.__cause__, LibraryError)


def test_errors_that_are_not_the_peers_pass_unchanged() -> None:
    with pytest.raises(KeyError), ERRORS.map_exceptions(translate):
        raise KeyError("a bug, not an outage")


def test_core_errors_pass_unchanged() -> None:
    def never(exc: Exception) -> Exception | None:
        raise AssertionError("core errors are not translated")

    with pytest.raises(NotFound), ERRORS.map_exceptions(never):
        raise NotFound("File not found in storage")


def test_a_closing_bridge_is_unavailable_and_a_missing_bridge_is_a_bug() -> None:
    with pytest.raises(Unavailable, match="Thing store unavailable: shutting down"), ERRORS.map_exceptions(translate):
        raise BridgeClosed("loop closed")
    with pytest.raises(BridgeMissing), ERRORS.map_exceptions(translate):
        raise BridgeMissing("not wired")


def test_failures_are_logged_at_most_every_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    errors = StoreErrors("Thing store", "Peer", logging.getLogger("test.store_errors.log"))
    with caplog.at_level(logging.WARNING, logger="test.store_errors.log"):
        errors.log_failure(LibraryError("first"))
        errors.log_failure(LibraryError("second"))
    assert [r.getMessage() for r in caplog.records] == ["Peer operation failed: LibraryError: first"]


async def test_call_answers_within_its_deadline() -> None:
    async def slow() -> None:
        await asyncio.sleep(30)

    async def fine() -> int:
        await asyncio.sleep(0)
        return 7

    async with open_bridge():
        assert await ERRORS.call(fine, timeout=5, translate=translate) == 7
        with pytest.raises(Unavailable, match=r"Thing store unavailable: no answer from Peer within 0\.05s"):
            await ERRORS.call(slow, timeout=0.05, translate=translate)

        async def failing() -> None:
            raise LibraryError("refused")

        with pytest.raises(Unavailable, match="peer said no"):
            await ERRORS.call(failing, timeout=5, translate=translate)
