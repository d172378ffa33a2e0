"""The run of a fast-path ``POST /exec`` in the request's own task, its commit paced beside it.

``api.exec_http.start`` (the Quart route's way) runs ``core.exec`` in a task of the request's
nursery that reports its result through a channel to the commit :class:`~api.commit_driver.Driver`
waiting in the request task. Every answered run thus pays two scheduler round trips on its critical
path: the run task's first step comes a loop iteration after it was started, and the waiting request
task resumes a loop iteration after the result was sent. At one request at a time, on this VM's cold
caches, that is measurable next to a ~4 ms ``print('hi')``.

So :func:`run_here` swaps the roles: the request task runs the execution itself, and a small task
(:class:`Committed`) owns what needs a clock while it runs: the grace timer, the hold and settle of
``api.exec_commit``, and, once the machine commits, the heartbeat stream. The decision is the same
machine fed the same events, so ``keepalive.md`` holds unchanged:

* a result that comes before the machine committed is answered plainly by the request task (a busy
  run is still a real 503, a failure still its own status); the pacer, woken later, finds the
  machine ``DONE`` and stops. A timer that expired but whose task has not run yet loses to the
  result, as a queued result wins over a timer in the driver (``_next_signal``);
* an acquisition decided while holding the commit still wakes the pacer through the channel (it
  starts the settle timer); in every other stage it is only recorded, as before;
* once the pacer committed, the result goes to it through the channel, exactly as the run task's
  result went to the driver, and it sends the rest (heartbeats, then the answer) while the request
  task waits for it: the request still ends only when its response is complete;
* a client that leaves cancels the request's nursery, and with it this run and the pacer.

The Quart route keeps ``start``; ``tests/integration/ops/test_exec_fast.py`` and
``test_exec_commit_paths.py`` compare both byte for byte, including a busy answer while the commit
is held, an acquisition that ends a hold, a run failing behind a commit and a client leaving one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable, Callable

import outcome
import trio

from kcr_trio.core.exec import ExecOutcome, ExecRequest
from kcr_trio.core.languages import Language

from .commit_driver import ACQUIRED, Driver
from .exec_commit import Commit, CommitPolicy, ExecCommit, Stage, Wait
from .exec_http import Run, Signal, capture, committed_body, watched_phases
from .scope import RequestScope
from .services import Services

Stream = Callable[[AsyncGenerator[bytes, None]], Awaitable[None]]
"""Sends a committed answer's body (``api.exec_fast._stream``, bound to the request's ``send``)."""


async def run_here(svc: Services, rs: RequestScope, req: ExecRequest, language: Language,
                   stream: Stream) -> outcome.Maybe[ExecOutcome] | Committed:
    """Run ``req`` in this task: the result to answer plainly, or the :class:`Committed` answer
    whose pacer sends the rest (await its ``finish`` outside the error handling: once the head
    is out, an error can only end the stream). A pacer failing before the commit raises here."""
    send, receive = trio.open_memory_channel[Signal](math.inf)
    machine = ExecCommit(CommitPolicy.from_settings(svc.settings))
    phases = watched_phases(machine, send, rs)  # holding the commit: the pacer hears of acquisition
    driver: Run = Driver(machine, receive)
    first = driver.start()
    result: outcome.Maybe[ExecOutcome] | None = None
    pacer: Committed | None = None
    with trio.CancelScope() as run_scope:
        if isinstance(first, Wait) and first.until is not None:  # no timer (heartbeat off): no pacer
            pacer = Committed(driver, rs, req, stream, run_scope)
            rs.nursery.start_soon(pacer.run, first)
        result = await capture(svc.exec_service, req, language, phases)
    committed = machine.stage is Stage.STREAMING
    if result is None:  # the pacer failed and cut the run short
        assert pacer is not None and pacer.error is not None
        if committed:
            return pacer  # the stream's send failed: its finish raises it
        raise pacer.error  # a bug before the commit: answered 500
    if not committed:  # answered here, status and all
        machine.result_ready(trio.current_time())
        return result
    assert pacer is not None
    send.send_nowait(result)  # the pacer's driver takes it, as it took the run task's
    return pacer


class Committed:
    """The commit's clock while the run is in the request task (the pacer); once committed, the
    stream. :meth:`finish` waits until the stream is sent, and raises its failure."""

    def __init__(self, driver: Run, rs: RequestScope, req: ExecRequest, stream: Stream,
                 run_scope: trio.CancelScope) -> None:
        self.driver = driver
        self.rs = rs
        self.req = req
        self.stream = stream
        self.run_scope = run_scope
        self.done = trio.Event()
        self.error: Exception | None = None

    async def run(self, action: Wait) -> None:
        try:
            if await self._until_commit(action):
                await self.stream(committed_body(self.driver, self.rs, self.req))
        except Exception as exc:  # the request task raises it, as its own decision or send would
            self.error = exc
            self.run_scope.cancel()  # a no-op once the run is over
        finally:
            self.done.set()

    async def finish(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error

    async def _until_commit(self, action: Wait) -> bool:
        """Feed the machine its timers (and a held commit's acquisition) until it commits: True;
        False once the request task answered plainly."""
        machine = self.driver.machine
        next_action: Wait | Commit = action
        while isinstance(next_action, Wait):
            got = await _signal_or_timer(self.driver.receive, next_action.until)
            if machine.stage is Stage.DONE:  # answered plainly meanwhile: nothing left to pace
                return False
            now = trio.current_time()
            decided = machine.acquisition_decided(now) if got == ACQUIRED else machine.timer_fired(now)
            if not isinstance(decided, (Wait, Commit)):  # only a result answers, and none comes here
                raise AssertionError(f"unexpected action before the commit: {decided}")
            next_action = decided
        return True


async def _signal_or_timer(receive: trio.MemoryReceiveChannel[Signal], until: float | None) -> Signal | None:
    """The channel's next signal (only :data:`ACQUIRED` comes before a commit), or None at ``until``."""
    with trio.move_on_at(math.inf if until is None else until):
        return await receive.receive()
    return None

