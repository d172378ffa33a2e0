"""When ``/exec`` answers at once and when it commits a heartbeat ``200``: the decision, without I/O.

LibreChat's HTTP client drops a socket that stays silent for 5 s (``keepalive.md``), yet a run may
take minutes. So a slow ``/exec`` commits ``200`` early and sends one :data:`HEARTBEAT` byte at least
every ``KCR_HEARTBEAT_INTERVAL`` until the JSON answer follows (JSON allows leading whitespace, so
the client's parser never sees the spaces). Committing early has a price: once the status line is
out, an error can no longer be a 4xx/5xx, only a ``{"status": "error"}`` body. Hence the rules:

1. **Grace.** A run that ends within ``KCR_HEARTBEAT_GRACE`` is answered plainly, status and all.
2. **Hold while acquiring.** If no sandbox is held yet when the grace ends, a "busy" answer (503 +
   ``Retry-After``) may still come, so the commit waits until acquisition is decided, but never past
   ``KCR_COMMIT_HOLD_MAX`` from the start (below the client's 5 s timer, so silence never kills it).
3. **Settle.** Once acquisition is decided, wait :data:`ACQUIRE_SETTLE` more, so a failure that is
   on its way out of the core is still answered with its real status.
4. **Heartbeat.** Otherwise commit: one heartbeat now, one after every interval, then the answer.

This module is that decision and nothing else, written in the style of hypercorn's protocol core:
:class:`ExecCommit` is a state machine fed events (``start``, ``acquisition_decided``,
``result_ready``, ``timer_fired``, ``beat_sent``), each stamped with the caller's clock, and it
answers with the action to take. It never sleeps, reads a clock or touches a socket, so every branch
is unit-tested with plain numbers (``tests/unit/test_exec_commit.py``); ``api/commit_driver.py``
owns the timers, the channel the events arrive on and the heartbeats, and ``api/exec_http.py`` the
response. ``/exec/programmatic`` answers by the same machine (``api/ptc_answer.py``) with no hold:
its runs report no acquisition, so its policy has ``hold_max = 0``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kcr_trio.config import Settings

HEARTBEAT: Final = b" "
"""One heartbeat: a space, which a JSON parser skips as leading whitespace."""

HEARTBEAT_HEADERS: Final = {"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"}
"""Headers of a committed heartbeat response: no proxy may buffer or transform it (nginx's
``X-Accel-Buffering``), or the spaces would not reach the client in time."""

ACQUIRE_SETTLE: Final = 0.05
"""Seconds to wait after acquisition is decided before committing. A failed acquisition (busy,
executor down) is decided a few scheduler steps before its error reaches the edge: it still has to
leave the sandbox context manager, the core's cancel scope and the run task. Waiting this long keeps
such an answer a real 503 instead of an error body behind a committed 200; a run that happens to
end within it is answered plainly too. Short enough to be invisible next to a 1 s grace."""


@dataclass(frozen=True)
class CommitPolicy:
    """The settings the decision depends on (all in seconds)."""

    enabled: bool  # KCR_HEARTBEAT: false waits for the result, whatever it takes
    grace: float  # KCR_HEARTBEAT_GRACE: answer plainly if the result comes this soon
    hold_max: float  # KCR_COMMIT_HOLD_MAX: hold the commit while acquiring, at most this long from the start
    interval: float  # KCR_HEARTBEAT_INTERVAL: at most this long between two heartbeats

    @classmethod
    def from_settings(cls, settings: Settings) -> CommitPolicy:
        return cls(
            enabled=settings.kcr_heartbeat,
            grace=settings.kcr_heartbeat_grace,
            hold_max=settings.kcr_commit_hold_max,
            interval=settings.kcr_heartbeat_interval,
        )


# -- actions: what the driver does next ------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Wait for the next event, or until ``until`` (the caller's clock) and then report
    ``timer_fired``. ``None``: no timer, only an event can come."""

    until: float | None


@dataclass(frozen=True)
class AnswerNow:
    """Nothing is committed yet: answer with the result as a plain response (a 4xx/5xx stays one)."""


@dataclass(frozen=True)
class Commit:
    """Commit ``200`` with :data:`HEARTBEAT_HEADERS`, send :data:`HEARTBEAT`, report ``beat_sent``."""


@dataclass(frozen=True)
class Beat:
    """Send :data:`HEARTBEAT` on the committed response, then report ``beat_sent``."""


@dataclass(frozen=True)
class Finish:
    """Send the result as the committed response's last bytes."""


Action = Wait | AnswerNow | Commit | Beat | Finish


class Stage(enum.Enum):
    GRACE = "grace"  # waiting for a fast result
    WAITING = "waiting"  # heartbeat off: waiting for the result, no timer
    HOLD = "hold"  # grace over, acquisition undecided: a 503 may still come
    SETTLE = "settle"  # acquisition decided: a last moment for its error to arrive
    STREAMING = "streaming"  # 200 committed, heartbeats flowing
    DONE = "done"  # the answer is decided (AnswerNow or Finish was returned)


class ProtocolError(RuntimeError):
    """An event the current stage cannot receive (a driver bug, never the client's doing)."""


class ExecCommit:
    """The commit/heartbeat decision of one ``/exec`` request (see the module docstring)."""

    def __init__(self, policy: CommitPolicy) -> None:
        self.policy = policy
        self.stage: Stage | None = None
        self.acquired = False  # acquisition is decided (held or failed)
        self.started = 0.0
        self._until: float | None = None  # the timer of the current Wait

    def start(self, now: float) -> Action:
        """The run was started at ``now``."""
        if self.stage is not None:
            raise ProtocolError("started twice")
        self.started = now
        if not self.policy.enabled:
            return self._wait(Stage.WAITING, None)
        return self._wait(Stage.GRACE, now + self.policy.grace)

    def acquisition_decided(self, now: float) -> Action:
        """The core holds a sandbox, or failed to get one."""
        self._check_live("acquisition_decided")
        self.acquired = True
        if self.stage is Stage.HOLD:
            return self._wait(Stage.SETTLE, now + ACQUIRE_SETTLE)
        return Wait(self._until)  # grace, settle and heartbeats keep their timers

    def records_acquisition(self) -> bool:
        """Whether :meth:`acquisition_decided` now would only record it: the action it returns is
        the current :class:`Wait`, timer and all. True in every live stage but ``HOLD`` (where it
        starts the settle timer), so a caller may report it without waking whoever waits."""
        return self.stage in (Stage.GRACE, Stage.WAITING, Stage.SETTLE, Stage.STREAMING)

    def result_ready(self, now: float) -> Action:
        """The run ended (with an answer or an error)."""
        self._check_live("result_ready")
        committed = self.stage is Stage.STREAMING
        self.stage, self._until = Stage.DONE, None
        return Finish() if committed else AnswerNow()

    def timer_fired(self, now: float) -> Action:
        """The timer of the last :class:`Wait` expired with no result."""
        self._check_live("timer_fired")
        if self.stage is Stage.GRACE:
            if self.acquired:
                return self._wait(Stage.SETTLE, now + ACQUIRE_SETTLE)
            if self.policy.hold_max > self.policy.grace:
                return self._wait(Stage.HOLD, self.started + self.policy.hold_max)
            return self._commit()
        if self.stage in (Stage.HOLD, Stage.SETTLE):
            return self._commit()
        if self.stage is Stage.STREAMING:
            return Beat()
        raise ProtocolError(f"timer fired in stage {self.stage}")

    def beat_sent(self, now: float) -> Action:
        """A heartbeat reached the transport at ``now``: the next one is due an interval later."""
        if self.stage is not Stage.STREAMING:
            raise ProtocolError(f"beat sent in stage {self.stage}")
        return self._wait(Stage.STREAMING, now + self.policy.interval)

    # -- internals --------------------------------------------------------------------------------

    def _wait(self, stage: Stage, until: float | None) -> Wait:
        self.stage, self._until = stage, until
        return Wait(until)

    def _commit(self) -> Commit:
        self.stage, self._until = Stage.STREAMING, None
        return Commit()

    def _check_live(self, event: str) -> None:
        if self.stage is None or self.stage is Stage.DONE:
            raise ProtocolError(f"{event} in stage {self.stage}")
