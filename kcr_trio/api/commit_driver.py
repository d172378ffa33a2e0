"""The I/O half of :mod:`api.exec_commit`: timers, the channel a run's signals arrive on, the beats.

``ExecCommit`` decides when an answer is plain and when a ``200`` is committed behind heartbeats; it
never waits. :class:`Driver` does the waiting for it, the same way for ``/exec`` (``api/exec_http``)
and ``/exec/programmatic`` (``api/ptc_answer``): it waits for the run's next signal or the machine's
timer, whichever comes first, reports it, and keeps the result once it came. :func:`heartbeats` is the
committed response's body: a beat whenever the machine asks, then the final bytes.

A run sends two kinds of signals: :data:`ACQUIRED` (the core holds a sandbox or failed to get one;
only ``/exec`` reports it) and its result (whatever the route's run produces).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Final, Generic, Literal, TypeVar

import trio

from .exec_commit import HEARTBEAT, Action, Beat, ExecCommit, Finish, Wait

R = TypeVar("R")

ACQUIRED: Final = "acquired"
"""The signal of a decided acquisition (``Phases.on_acquisition_decided``)."""

Acquired = Literal["acquired"]


class _Timer:
    """What :func:`_next_signal` returns when the machine's timer expired first."""


_TIMER: Final = _Timer()


class Driver(Generic[R]):
    """Feeds a run's signals and the timers to the decision; keeps the result ``R`` once it came."""

    def __init__(self, machine: ExecCommit, receive: trio.MemoryReceiveChannel[R | Acquired]) -> None:
        self.machine = machine
        self.receive = receive
        self._result: tuple[R] | None = None  # a tuple, so that any R (even None) counts as came

    def start(self) -> Action:
        return self.machine.start(trio.current_time())

    async def decide(self) -> Action:
        """Start, and wait until the answer is decided: plain (``AnswerNow``) or ``Commit``."""
        action = self.start()
        while isinstance(action, Wait):
            action = await self.next_action(action)
        return action

    async def next_action(self, wait: Wait) -> Action:
        """Wait as ``wait`` says; the machine's next action for what happened."""
        signal = await _next_signal(self.receive, wait.until)
        now = trio.current_time()
        if isinstance(signal, _Timer):
            return self.machine.timer_fired(now)
        if signal == ACQUIRED:
            return self.machine.acquisition_decided(now)
        self._result = (signal,)
        return self.machine.result_ready(now)

    def take(self) -> R:
        """The result (after ``AnswerNow`` or ``Finish``)."""
        if self._result is None:
            raise AssertionError("the answer was decided without a result")
        return self._result[0]


async def heartbeats(driver: Driver[R], final: Callable[[R], Awaitable[bytes]]) -> AsyncGenerator[bytes, None]:
    """The body of a committed answer: the commit's first beat, one more whenever the machine says,
    then ``await final(result)`` (the route's last bytes: the answer, or its error as a body)."""
    action: Action = Beat()  # the commit's first heartbeat
    while not isinstance(action, Finish):
        if isinstance(action, Beat):
            yield HEARTBEAT
            action = driver.machine.beat_sent(trio.current_time())
        elif isinstance(action, Wait):
            action = await driver.next_action(action)
        else:
            raise AssertionError(f"unexpected action after the commit: {action}")
    yield await final(driver.take())


async def _next_signal(receive: trio.MemoryReceiveChannel[R | Acquired], until: float | None) -> R | Acquired | _Timer:
    """The next signal of the run, or the timer marker once ``until`` passed. Signals already queued come
    first, so a result that is ready when a timer expires is never mistaken for silence."""
    try:
        return receive.receive_nowait()
    except trio.WouldBlock:
        pass
    with trio.move_on_at(math.inf if until is None else until):
        return await receive.receive()
    return _TIMER
