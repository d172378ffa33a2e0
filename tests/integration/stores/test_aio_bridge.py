"""The bridge's promises: cancellation reaches the asyncio task and waits for its cleanup; asyncio's
CancelledError never leaks into Trio code; a missing bridge is a clear wiring error."""

from __future__ import annotations

import asyncio

import pytest
import trio

from kcr_trio.backends.aio_bridge import BridgeClosed, BridgeMissing, bridge_running, open_bridge, run_aio


async def test_missing_bridge_is_a_clear_error() -> None:
    async def coro() -> int:
        return 1

    assert not bridge_running()
    with pytest.raises(BridgeMissing, match="open_bridge"):
        await run_aio(coro)


async def test_result_and_exceptions_cross(bridge) -> None:
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    async def boom() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    assert await run_aio(add, 2, b=3) == 5
    with pytest.raises(KeyError):
        await run_aio(boom)


async def test_cancellation_waits_for_the_asyncio_cleanup(bridge) -> None:
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            events.append("cleanup started")
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            events.append("cleanup done")

    with trio.move_on_after(0.01) as scope:
        await run_aio(slow)
    assert scope.cancelled_caught
    assert events == ["cleanup started", "cleanup done"]  # finished before we resumed


async def test_asyncio_side_cancellation_is_not_a_trio_cancel(bridge) -> None:
    async def cancels_itself() -> None:
        raise asyncio.CancelledError()

    with pytest.raises(BridgeClosed):
        await run_aio(cancels_itself)


async def test_open_bridge_is_reentrant(bridge) -> None:
    async with open_bridge():
        async def one() -> int:
            return 1

        assert await run_aio(one) == 1
    assert bridge_running()  # the outer bridge is still open
