"""One warm-pool model for both executors: per-language targets, warm items, take / put back /
refill decisions and busy accounting, with no I/O and nothing backend-specific.

The Kubernetes executor keeps single-use pods warm, the local executor reusable sidecar
processes; both answer the same questions ("is a warm one there?", "how many should start now?",
"does a used one go back?", "how long to back off after a failed start?", "what do I report?").
Writing those answers once keeps the two executors' behaviour (and their ``/ready`` fields) from
drifting apart, and makes the rules testable without pods or processes.

The item type ``T`` is the executor's handle (a tracked pod, a sidecar process). The executor does
all the I/O (creating, resetting, deleting items) and tells the pool what happened; the pool only
counts and decides. The one Trio dependency is waiting: :meth:`WarmPool.wait_for` queues a request
first come first served until an item is offered, and :attr:`WarmPool.refilled` fires whenever an
item is kept warm (tests and the reclaim benchmark wait on it).

Counting rules (the executor calls these; every counter has one increment and one decrement):

* ``in_use``: :meth:`~WarmPool.take`, :meth:`~WarmPool.wait_for` and :meth:`~WarmPool.claim` add
  one; :meth:`~WarmPool.put_back` (the item is reusable) or :meth:`~WarmPool.release` (it is gone)
  take it away again.
* ``starting``: :meth:`~WarmPool.plan_starts` adds as many as should start now; the executor calls
  :meth:`~WarmPool.start_ended` once per start in a ``finally`` (also on cancellation), then
  :meth:`~WarmPool.start_succeeded` or :meth:`~WarmPool.start_failed`.
* ``returning`` and ``growing`` (reusable items, the local executor): items on their way back
  (being reset after a run) and starts begun for a miss (:meth:`~WarmPool.plan_grow`). Together
  they are what is *coming*: :meth:`~WarmPool.wait_for_coming` queues a run only for an item that
  is coming, and :meth:`~WarmPool.dismiss_excess_waiters` lets the newest waiters go (to start
  their own) when fewer are coming than wait.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")

__all__ = ["WarmPool", "WarmPools", "backoff_delay"]

BACKOFF_BASE = 0.5  # seconds after the first failed start
BACKOFF_CAP = 30.0  # longest pause between attempts while starts keep failing


def backoff_delay(failures_in_a_row: int, retry_after: float | None = None) -> float:
    """Pause before the next start after ``failures_in_a_row`` failed ones: doubling from
    ``BACKOFF_BASE``, capped at ``BACKOFF_CAP``, and never shorter than a server's
    ``Retry-After``. A broken image or a refusing API then costs one attempt per pause."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(failures_in_a_row, 6))
    return max(delay, retry_after) if retry_after is not None else delay


@dataclass(eq=False)
class _Waiter(Generic[T]):
    event: trio.Event = field(default_factory=trio.Event)
    item: T | None = None
    abandoned: bool = False


class WarmPool(Generic[T]):
    """One language's warm items and the counters around them."""

    def __init__(self, language: str, target: int) -> None:
        self.language = language
        self.target = max(0, int(target))
        self.ready: deque[T] = deque()  # warm items, oldest first (handed out first)
        self.starting = 0  # starts planned and not ended yet
        self.in_use = 0  # items handed out and not put back or released yet
        self.warmed = False  # reached its target at least once
        self.last_error: str | None = None  # why the last start failed
        self.start_waiting: str | None = None  # why a start is still waiting (unschedulable, pull retries)
        self.failures_in_a_row = 0
        self.retry_scheduled = False  # a failed start is backing off; it will refill afterwards
        self.refilled = trio.Event()  # set (and replaced) whenever an item is kept warm
        self.returning = 0  # used items on their way back (being reset)
        self.growing = 0  # starts begun for a miss (plan_grow), beyond the refill to target
        self._waiters: deque[_Waiter[T]] = deque()

    def __repr__(self) -> str:
        return (f"WarmPool({self.language!r}, target={self.target}, ready={len(self.ready)}, "
                f"starting={self.starting}, in_use={self.in_use}, queued={self.queued})")

    # --- taking --------------------------------------------------------------------------------
    def take(self) -> T | None:
        """The oldest warm item, counted in use; ``None`` when none is warm."""
        if not self.ready:
            return None
        return self.claim(self.ready.popleft())

    def claim(self, item: T) -> T:
        """Count an item obtained outside the warm list (a cold start) as in use."""
        self.in_use += 1
        return item

    async def wait_for(self, timeout: float) -> T | None:
        """Queue for the next offered item, first come first served, for up to ``timeout``
        seconds: the item (counted in use), or ``None`` when none came. If the caller is cancelled
        after an item was handed to it, the item goes on to the next waiter (or back warm)."""
        waiter: _Waiter[T] = _Waiter()
        self._waiters.append(waiter)
        try:
            with trio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:
            handed = self._abandon(waiter)
            if handed is not None:
                self.offer(handed)
            raise
        handed = self._abandon(waiter)
        return None if handed is None else self.claim(handed)

    def _abandon(self, waiter: _Waiter[T]) -> T | None:
        waiter.abandoned = True
        if waiter.item is None:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        return waiter.item

    @property
    def queued(self) -> int:
        """Requests waiting for an item."""
        return sum(1 for w in self._waiters if not w.abandoned)

    def coming(self) -> int:
        """Items that will soon be free: on their way back, or being started for a miss."""
        return self.returning + self.growing

    async def wait_for_coming(self, timeout: float) -> T | None:
        """Like :meth:`wait_for`, but only when more items are coming than requests already wait
        for them; else ``None`` at once (the caller starts its own instead of waiting in vain).
        Whichever coming item is free first goes to the longest-waiting request. Returns ``None``
        without a checkpoint: the caller's cold start follows at once."""
        if self.coming() <= self.queued:
            return None
        return await self.wait_for(timeout)

    def dismiss_excess_waiters(self) -> None:
        """Wake the newest waiters, with no item, until no more wait than items are coming (call
        after ``returning`` or ``growing`` dropped): they stop waiting for an item that will not
        come."""
        while self._waiters and self.queued > self.coming():
            waiter = self._waiters.pop()
            if not waiter.abandoned:
                waiter.event.set()

    # --- giving back ---------------------------------------------------------------------------
    def offer(self, item: T) -> None:
        """A usable item: hand it to the longest-waiting request, else keep it warm."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.abandoned:
                waiter.item = item
                waiter.event.set()
                return
        self.ready.append(item)
        if len(self.ready) >= self.target:
            self.warmed = True
        self.refilled.set()
        self.refilled = trio.Event()

    def put_back(self, item: T) -> None:
        """An item in use is reusable (a reset sidecar): no longer in use, offered again."""
        self.in_use -= 1
        self.offer(item)

    def release(self) -> None:
        """An item in use is gone (deleted, destroyed): no longer in use."""
        self.in_use -= 1

    def remove(self, item: T) -> bool:
        """Forget a warm item that stopped being usable; whether it was warm here."""
        try:
            self.ready.remove(item)
        except ValueError:
            return False
        return True

    # --- refilling -----------------------------------------------------------------------------
    def shortfall(self) -> int:
        """Items missing from the target, counting the ones already starting."""
        return self.target - len(self.ready) - self.starting

    def plan_starts(self, parallel: int) -> int:
        """How many starts to begin now (counted in ``starting``): what the pool lacks, at most
        ``parallel`` starting at once, one at a time while starts keep failing, none while a
        failed start backs off."""
        if self.retry_scheduled:
            return 0
        room = (1 if self.failures_in_a_row else parallel) - self.starting
        n = max(0, min(self.shortfall(), room))
        self.starting += n
        return n

    def plan_grow(self, live: int, capacity: int) -> bool:
        """Whether to start one more item for a miss (counted in ``growing`` until
        :meth:`grow_ended`): the pool follows demand up to ``max(target, capacity)`` items of this
        language in all (``live``: the executor's count of its items that exist, in any state)."""
        if live + self.growing >= max(self.target, capacity):
            return False
        self.growing += 1
        return True

    def grow_ended(self) -> None:
        """One start begun by :meth:`plan_grow` is over, however it ended (call in a ``finally``)."""
        self.growing -= 1

    def start_ended(self) -> None:
        """One planned start is over, however it ended (call in a ``finally``)."""
        self.starting -= 1

    def note_start_waiting(self, reason: str | None) -> bool:
        """Record why a start is still waiting; whether that is news (worth a log line)."""
        if reason == self.start_waiting:
            return False
        self.start_waiting = reason
        return True

    def start_succeeded(self, item: T) -> None:
        """A started item is usable: the failure streak ends and the item is offered."""
        self.failures_in_a_row = 0
        self.last_error = self.start_waiting = None
        self.offer(item)

    def start_failed(self, reason: str, retry_after: float | None = None) -> float | None:
        """A start failed: the seconds to back off before refilling, or ``None`` when another
        failed start is already backing off (starts that failed together retry together). The
        caller sleeps, then calls :meth:`backoff_ended` (in a ``finally``) and refills."""
        self.last_error, self.start_waiting = reason, None
        if self.retry_scheduled:
            return None
        self.failures_in_a_row += 1
        self.retry_scheduled = True
        return backoff_delay(self.failures_in_a_row, retry_after)

    def backoff_ended(self) -> None:
        self.retry_scheduled = False

    # --- reporting -----------------------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        """Why this pool cannot fill now, if anything is known to stop it."""
        return self.start_waiting or (self.last_error if self.failures_in_a_row else None)

    @property
    def filled_once(self) -> bool:
        """Reached its target once (or has none): readiness need not wait for it."""
        return self.warmed or self.target == 0

    async def wait_filled_once(self) -> None:
        while not self.filled_once:
            await self.refilled.wait()

    def counts(self) -> dict[str, Any]:
        """The per-language fields both executors report under ``status()["pools"]``."""
        return {
            "target": self.target,
            "ready": len(self.ready),
            "starting": self.starting,
            "in_use": self.in_use,
            "waiting": self.queued,
            "warmed": self.filled_once,
            "last_error": self.last_error,
        }


class WarmPools(Mapping[str, WarmPool[T]]):
    """One :class:`WarmPool` per language, plus the rules that span languages."""

    def __init__(self, targets: Mapping[str, int]) -> None:
        self._pools: dict[str, WarmPool[T]] = {lang: WarmPool(lang, n) for lang, n in targets.items()}

    def __getitem__(self, language: str) -> WarmPool[T]:
        return self._pools[language]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    @property
    def in_use(self) -> int:
        return sum(p.in_use for p in self._pools.values())

    def may_keep(self, language: str, capacity: int) -> bool:
        """Whether a used, reusable item of ``language`` should go back warm rather than away.

        A language keeps at most ``max(target, capacity)`` warm items, and all languages together
        at most ``capacity`` beyond their targets, so a burst of rare languages cannot pin memory
        while the common ones stay at their targets."""
        pool = self._pools[language]
        if len(pool.ready) >= max(pool.target, capacity):
            return False
        if len(pool.ready) < pool.target:
            return True
        extra = sum(max(0, len(p.ready) - p.target) for p in self._pools.values())
        return extra < capacity

    def make_room(self, language: str) -> T | None:
        """Free a place in the shared allowance beyond targets for ``language``: the longest-warm
        item of the other language with the most warm items beyond its target, removed from its
        pool (the caller destroys it), or ``None`` when no other language is beyond its target.
        Used when :meth:`may_keep` refused only for the shared bound, so the allowance follows
        demand instead of staying pinned by a language the load moved away from."""
        over = [(len(p.ready) - p.target, lang) for lang, p in self._pools.items() if lang != language]
        if not over:
            return None
        excess, victim_language = max(over)
        if excess <= 0:
            return None
        return self._pools[victim_language].ready.popleft()

    async def wait_filled_once(self, timeout: float | None = None) -> bool:
        """Wait until every pool reached its target once (``True``), or the timeout passes."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            for pool in self._pools.values():
                await pool.wait_filled_once()
            return True
        return False
