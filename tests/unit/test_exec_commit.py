"""The /exec commit/heartbeat decision (``api/exec_commit.py``), driven with plain numbers: no
sockets, no clock, no trio. The wire behaviour is covered end to end in
``tests/integration/api/test_wire.py`` (heartbeat, busy 503 during the hold)."""

from __future__ import annotations

import random

import pytest

from kcr_trio.api.exec_commit import (
    ACQUIRE_SETTLE,
    HEARTBEAT,
    AnswerNow,
    Beat,
    Commit,
    CommitPolicy,
    ExecCommit,
    Finish,
    ProtocolError,
    Stage,
    Wait,
)

POLICY = CommitPolicy(enabled=True, grace=1.0, hold_max=4.0, interval=2.0)


def machine(policy: CommitPolicy = POLICY, start: float = 100.0) -> ExecCommit:
    m = ExecCommit(policy)
    assert m.start(start) == Wait(start + policy.grace)
    return m


def test_heartbeat_is_json_whitespace() -> None:
    assert HEARTBEAT.strip() == b"" and HEARTBEAT


def test_fast_result_is_answered_plainly() -> None:
    m = machine()
    assert m.acquisition_decided(100.2) == Wait(101.0)  # the grace keeps its timer
    assert m.result_ready(100.5) == AnswerNow()
    assert m.stage is Stage.DONE


def test_result_before_acquisition_is_answered_plainly() -> None:
    # A busy 503 (or any error) that comes within the grace is a plain answer.
    assert machine().result_ready(100.1) == AnswerNow()


def test_heartbeat_off_waits_for_the_result_without_a_timer() -> None:
    m = ExecCommit(CommitPolicy(enabled=False, grace=1.0, hold_max=4.0, interval=2.0))
    assert m.start(0.0) == Wait(None)
    assert m.acquisition_decided(3.0) == Wait(None)
    with pytest.raises(ProtocolError):
        m.timer_fired(10.0)  # a Wait(None) has no timer that could fire


def test_hold_while_acquiring_then_answer_a_late_busy_plainly() -> None:
    m = machine()
    # Grace over, no sandbox yet: hold until KCR_COMMIT_HOLD_MAX from the start.
    assert m.timer_fired(101.0) == Wait(104.0)
    assert m.stage is Stage.HOLD
    # Acquisition fails at 103: settle briefly, and the 503 arrives within it.
    assert m.acquisition_decided(103.0) == Wait(103.0 + ACQUIRE_SETTLE)
    assert m.result_ready(103.01) == AnswerNow()


def test_hold_ends_in_a_commit_when_acquisition_stays_undecided() -> None:
    m = machine()
    assert m.timer_fired(101.0) == Wait(104.0)
    assert m.timer_fired(104.0) == Commit()
    assert m.stage is Stage.STREAMING


def test_acquired_during_hold_commits_after_the_settle() -> None:
    m = machine()
    m.timer_fired(101.0)
    assert m.acquisition_decided(102.0) == Wait(102.0 + ACQUIRE_SETTLE)
    assert m.timer_fired(102.0 + ACQUIRE_SETTLE) == Commit()


def test_acquired_before_grace_end_settles_then_commits() -> None:
    m = machine()
    m.acquisition_decided(100.1)
    assert m.timer_fired(101.0) == Wait(101.0 + ACQUIRE_SETTLE)
    assert m.stage is Stage.SETTLE
    assert m.timer_fired(101.0 + ACQUIRE_SETTLE) == Commit()


def test_no_hold_when_the_cap_is_within_the_grace() -> None:
    m = machine(CommitPolicy(enabled=True, grace=1.0, hold_max=1.0, interval=2.0))
    assert m.timer_fired(101.0) == Commit()


def test_streaming_beats_every_interval_then_finishes() -> None:
    m = machine()
    m.acquisition_decided(100.1)
    m.timer_fired(101.0)
    assert m.timer_fired(101.05) == Commit()
    # The commit's first heartbeat went out at 101.06: the next is due an interval later.
    assert m.beat_sent(101.06) == Wait(103.06)
    assert m.timer_fired(103.06) == Beat()
    assert m.beat_sent(103.2) == Wait(105.2)  # measured from when the beat really left
    assert m.result_ready(104.0) == Finish()
    assert m.stage is Stage.DONE


@pytest.mark.parametrize("event", ["acquisition_decided", "result_ready", "timer_fired"])
def test_no_event_after_the_answer(event: str) -> None:
    m = machine()
    m.result_ready(100.1)
    with pytest.raises(ProtocolError):
        getattr(m, event)(100.2)


def test_events_before_start_and_a_second_start_are_refused() -> None:
    m = ExecCommit(POLICY)
    with pytest.raises(ProtocolError):
        m.result_ready(0.0)
    m.start(0.0)
    with pytest.raises(ProtocolError):
        m.start(0.0)
    with pytest.raises(ProtocolError):
        m.beat_sent(0.5)  # nothing committed yet


def test_random_runs_keep_the_contract() -> None:
    """Over many random runs: the first byte never comes later than the hold cap (or the grace) plus
    the settle, never before the grace; a result before the commit is answered plainly, after it is
    the stream's end; heartbeats are never further apart than the interval."""
    rng = random.Random(15)
    for _ in range(2000):
        policy = CommitPolicy(enabled=True, grace=rng.choice([0.0, 0.2, 1.0]),
                              hold_max=rng.choice([0.0, 2.0, 4.0]), interval=rng.choice([0.5, 2.0]))
        acquired_at = rng.choice([None, rng.uniform(0, 6)])
        result_at = rng.uniform(0, 12)
        m = ExecCommit(policy)
        action = m.start(0.0)
        now, committed_at, last_beat = 0.0, None, None
        pending_acquired = acquired_at is not None
        while True:
            assert isinstance(action, Wait)
            due = [t for t in (action.until, result_at, acquired_at if pending_acquired else None) if t is not None]
            now = max(now, min(due))
            if pending_acquired and acquired_at is not None and now >= acquired_at and acquired_at <= result_at:
                pending_acquired = False
                action = m.acquisition_decided(now)
                continue
            if now >= result_at:
                action = m.result_ready(now)
                assert action == (Finish() if committed_at is not None else AnswerNow())
                break
            action = m.timer_fired(now)
            if isinstance(action, (Commit, Beat)):
                if isinstance(action, Commit):
                    committed_at = now
                    assert policy.grace <= now <= max(policy.grace, policy.hold_max) + ACQUIRE_SETTLE + 1e-9
                if last_beat is not None:
                    assert now - last_beat <= policy.interval + 1e-9
                last_beat = now
                action = m.beat_sent(now)
        if result_at < policy.grace:
            assert committed_at is None


def test_an_acquisition_it_only_records_keeps_the_current_wait() -> None:
    """``records_acquisition``: the edge then tells the machine from the run's task instead of
    waking the driver; that is only right if the answer would have been the Wait already pending.
    Checked in every stage an acquisition can arrive in, and false while holding the commit."""
    rng = random.Random(16)
    seen: set[Stage | None] = set()
    for _ in range(2000):
        policy = CommitPolicy(enabled=rng.random() < 0.9, grace=rng.choice([0.0, 0.2, 1.0]),
                              hold_max=rng.choice([0.0, 2.0, 4.0]), interval=rng.choice([0.5, 2.0]))
        acquired_at, result_at = rng.uniform(0, 8), rng.uniform(0, 12)
        m = ExecCommit(policy)
        action, now, pending = m.start(0.0), 0.0, True
        while True:
            if isinstance(action, (Commit, Beat)):
                action = m.beat_sent(now)
                continue
            assert isinstance(action, Wait)
            now = max(now, min(t for t in (action.until, result_at, acquired_at if pending else None) if t is not None))
            if pending and now >= acquired_at and acquired_at <= result_at:
                pending, stage, silent = False, m.stage, m.records_acquisition()
                seen.add(stage)
                decided = m.acquisition_decided(now)
                assert silent == (stage is not Stage.HOLD)
                if silent:
                    assert decided == action, (stage, decided, action)
                else:
                    assert decided == Wait(now + ACQUIRE_SETTLE)
                action = decided
                continue
            if now >= result_at:
                m.result_ready(now)
                break
            action = m.timer_fired(now)
        assert not m.records_acquisition()  # the answer is decided: nothing to record any more
    assert seen == {Stage.GRACE, Stage.WAITING, Stage.HOLD, Stage.STREAMING}  # SETTLE follows an acquisition
