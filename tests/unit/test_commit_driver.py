"""The commit driver (``api/commit_driver.py``) on Trio's virtual clock: the I/O half of the
``/exec`` and ``/exec/programmatic`` answers, fed by a scripted run through a memory channel.

The state machine itself is covered in ``test_exec_commit.py``; here: that the driver turns the
channel and the clock into the right events (a queued result wins over an expired timer), that the
PTC policy (no hold) commits at the grace, and that the committed body beats at the interval and
ends with the final bytes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import trio
import trio.testing

from kcr_trio.api.commit_driver import ACQUIRED, Acquired, Driver, heartbeats
from kcr_trio.api.exec_commit import HEARTBEAT, AnswerNow, Commit, CommitPolicy, ExecCommit, Wait

EXEC = CommitPolicy(enabled=True, grace=1.0, hold_max=4.0, interval=2.0)
PTC = dataclasses.replace(EXEC, hold_max=0.0)  # what api/ptc_answer.py uses


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def channel() -> tuple[trio.MemorySendChannel[str | Acquired], trio.MemoryReceiveChannel[str | Acquired]]:
    return trio.open_memory_channel[str | Acquired](math.inf)


async def later(send: trio.MemorySendChannel[str | Acquired], delay: float, signal: str) -> None:
    await trio.sleep(delay)  # virtual time: the script of the run, not synchronisation
    send.send_nowait(signal)


async def final(result: str) -> bytes:
    return result.encode()


async def test_fast_result_is_answered_plainly(clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(PTC), receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(later, send, 0.5, "done")
        action = await driver.decide()
    assert isinstance(action, AnswerNow) and driver.take() == "done"
    assert trio.current_time() == pytest.approx(0.5)


async def test_ptc_policy_commits_at_the_grace_and_beats(clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(PTC), receive)
    beats: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(later, send, 6.5, "late")
        action = await driver.decide()
        assert isinstance(action, Commit)
        assert trio.current_time() == pytest.approx(1.0)  # no hold: PTC reports no acquisition
        chunks = []
        async for chunk in heartbeats(driver, final):
            if chunk == HEARTBEAT:
                beats.append(trio.current_time())
            chunks.append(chunk)
    assert chunks[-1] == b"late" and all(c == HEARTBEAT for c in chunks[:-1])
    assert beats == pytest.approx([1.0, 3.0, 5.0])  # the commit's beat, then one per interval


async def test_exec_policy_holds_until_acquisition_then_settles(clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(EXEC), receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(later, send, 2.0, ACQUIRED)
        action = await driver.decide()
    assert isinstance(action, Commit)
    assert trio.current_time() == pytest.approx(2.05)  # acquired at 2 s, then ACQUIRE_SETTLE


async def test_exec_policy_hold_ends_at_the_cap(clock: trio.testing.MockClock) -> None:
    _send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(EXEC), receive)
    action = await driver.decide()
    assert isinstance(action, Commit) and trio.current_time() == pytest.approx(4.0)


async def test_a_queued_result_wins_over_an_expired_timer(clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(PTC), receive)
    wait = driver.start()
    assert isinstance(wait, Wait) and wait.until == pytest.approx(1.0)
    send.send_nowait("ready")
    await trio.sleep(5)  # the grace is long over, yet the result is in the channel
    action = await driver.next_action(wait)
    assert isinstance(action, AnswerNow) and driver.take() == "ready"


async def test_heartbeat_off_waits_for_the_result(clock: trio.testing.MockClock) -> None:
    send, receive = channel()
    driver: Driver[str] = Driver(ExecCommit(dataclasses.replace(PTC, enabled=False)), receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(later, send, 60.0, "slow")
        action = await driver.decide()
    assert isinstance(action, AnswerNow) and driver.take() == "slow"


def test_take_before_a_result_is_a_bug() -> None:
    _send, receive = channel()
    with pytest.raises(AssertionError):
        Driver(ExecCommit(PTC), receive).take()
