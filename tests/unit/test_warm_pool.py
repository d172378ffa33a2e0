"""The warm-pool model both executors share: take / put back / refill decisions and counters,
without pods or processes (items here are plain strings)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kcr_trio.backends.warm_pool import BACKOFF_CAP, WarmPool, WarmPools, backoff_delay


def test_take_hands_out_the_oldest_warm_item_and_counts_it() -> None:
    pool: WarmPool[str] = WarmPool("py", 2)
    assert pool.take() is None and pool.in_use == 0
    pool.offer("a")
    pool.offer("b")
    assert pool.take() == "a"
    assert (len(pool.ready), pool.in_use) == (1, 1)
    pool.release()
    assert pool.in_use == 0


def test_warmed_once_the_target_was_reached() -> None:
    pool: WarmPool[str] = WarmPool("py", 2)
    assert not pool.filled_once
    pool.offer("a")
    assert not pool.warmed
    pool.offer("b")
    assert pool.warmed
    pool.take()
    assert pool.filled_once  # stays true: readiness does not flap with traffic
    assert WarmPool("js", 0).filled_once


def test_plan_starts_fills_the_shortfall_within_the_parallel_bound() -> None:
    pool: WarmPool[str] = WarmPool("py", 5)
    assert pool.plan_starts(parallel=2) == 2
    assert pool.starting == 2
    assert pool.plan_starts(parallel=2) == 0  # both slots busy
    pool.start_ended()
    pool.start_succeeded("a")
    assert pool.shortfall() == 3  # 5 - 1 ready - 1 starting
    assert pool.plan_starts(parallel=2) == 1
    assert pool.starting == 2


def test_failed_starts_back_off_together_and_then_go_one_at_a_time() -> None:
    pool: WarmPool[str] = WarmPool("py", 3)
    assert pool.plan_starts(parallel=3) == 3
    for _ in range(3):
        pool.start_ended()
    assert pool.start_failed("image missing") == backoff_delay(1)
    assert pool.start_failed("image missing") is None  # one retry for starts that failed together
    assert pool.start_failed("image missing") is None
    assert pool.problem == "image missing"
    assert pool.plan_starts(parallel=3) == 0  # backing off
    pool.backoff_ended()
    assert pool.plan_starts(parallel=3) == 1  # still failing: one probe at a time
    pool.start_ended()
    pool.start_succeeded("a")
    assert (pool.failures_in_a_row, pool.last_error, pool.problem) == (0, None, None)
    assert pool.plan_starts(parallel=3) == 2


def test_backoff_doubles_is_capped_and_honours_retry_after() -> None:
    assert backoff_delay(1) < backoff_delay(2) < backoff_delay(3)
    assert backoff_delay(50) == BACKOFF_CAP
    assert backoff_delay(1, retry_after=7.0) == 7.0
    assert backoff_delay(50, retry_after=1.0) == BACKOFF_CAP


def test_start_waiting_is_news_once_and_is_a_problem() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    assert pool.note_start_waiting("Unschedulable: 0/3 nodes")
    assert not pool.note_start_waiting("Unschedulable: 0/3 nodes")
    assert pool.problem == "Unschedulable: 0/3 nodes"
    pool.start_succeeded("a")
    assert pool.problem is None


def test_remove_forgets_only_warm_items() -> None:
    pool: WarmPool[str] = WarmPool("py", 2)
    pool.offer("a")
    assert pool.remove("a") and not pool.ready
    assert not pool.remove("a")


def test_put_back_offers_the_item_again() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    item = pool.claim("cold")
    assert pool.in_use == 1
    pool.put_back(item)
    assert pool.in_use == 0 and list(pool.ready) == ["cold"]


async def test_waiters_are_served_first_come_first_served() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    got: dict[str, str | None] = {}

    async def request(name: str) -> None:
        got[name] = await pool.wait_for(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.queued == 2
        pool.offer("a")
        pool.offer("b")
    assert got == {"first": "a", "second": "b"}
    assert pool.in_use == 2 and not pool.ready and pool.queued == 0


async def test_a_waiter_times_out_with_none_and_leaves_the_queue() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    assert await pool.wait_for(0.01) is None
    assert pool.queued == 0 and pool.in_use == 0
    pool.offer("a")
    assert list(pool.ready) == ["a"]  # nobody waits for it any more


async def test_a_cancelled_waiter_passes_a_handed_item_on() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    got: list[str | None] = []
    impatient = trio.CancelScope()

    async def impatient_request() -> None:
        with impatient:
            await pool.wait_for(10)
            pytest.fail("the impatient request should have been cancelled")

    async def patient_request() -> None:
        got.append(await pool.wait_for(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient_request)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(patient_request)
        await trio.testing.wait_all_tasks_blocked()
        # Cancelled, and before it runs again, an item is offered: the queue still lists it first.
        impatient.cancel()
        pool.offer("a")
    assert got == ["a"]
    assert pool.in_use == 1 and pool.queued == 0


async def test_a_cancelled_waiter_with_nobody_behind_keeps_the_item_warm() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    scope = trio.CancelScope()

    async def request() -> None:
        with scope:
            await pool.wait_for(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        pool.offer("a")  # handed over before the cancelled request ran again
    assert list(pool.ready) == ["a"] and pool.in_use == 0


async def test_refilled_fires_when_an_item_is_kept_warm() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    fired = pool.refilled
    pool.offer("a")
    assert fired.is_set() and not pool.refilled.is_set()


def test_may_keep_bounds_each_language_and_the_extras_together() -> None:
    pools: WarmPools[str] = WarmPools({"py": 2, "js": 0, "go": 0})
    assert set(pools) == {"py", "js", "go"} and len(pools) == 3
    assert pools.may_keep("py", capacity=2)  # below its target
    for item in ("p1", "p2"):
        pools["py"].offer(item)
    assert not pools.may_keep("py", capacity=2)  # at max(target, capacity)
    assert pools.may_keep("js", capacity=2)  # extras: 0 of 2
    pools["js"].offer("j1")
    pools["go"].offer("g1")
    assert not pools.may_keep("js", capacity=2)  # extras across languages: 2 of 2
    assert not pools.may_keep("go", capacity=2)


async def test_wait_filled_once_covers_every_language() -> None:
    pools: WarmPools[str] = WarmPools({"py": 1, "js": 1, "go": 0})
    assert not await pools.wait_filled_once(0.01)
    pools["py"].offer("p")
    pools["js"].offer("j")
    assert await pools.wait_filled_once(0.01)
    pools["py"].claim("x")
    assert pools.in_use == 1


def test_counts_are_the_reported_fields() -> None:
    pool: WarmPool[str] = WarmPool("py", 2)
    pool.offer("a")
    pool.plan_starts(parallel=5)
    assert pool.counts() == {"target": 2, "ready": 1, "starting": 1, "in_use": 0, "waiting": 0,
                             "warmed": False, "last_error": None}


async def test_wait_for_coming_queues_only_for_items_that_are_coming() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    assert await pool.wait_for_coming(5) is None  # nothing coming: start your own
    pool.returning += 1
    got: list[str | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(pool, got))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.queued == 1
        assert await pool.wait_for_coming(5) is None  # the one coming is already spoken for
        pool.returning -= 1
        pool.offer("a")
    assert got == ["a"] and pool.in_use == 1


async def _collect(pool: WarmPool[str], got: list[str | None]) -> None:
    got.append(await pool.wait_for_coming(5))


async def test_dismiss_excess_waiters_lets_the_newest_go_first() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    pool.growing = 2
    order: list[tuple[int, str | None]] = []

    async def wait(i: int) -> None:
        order.append((i, await pool.wait_for_coming(5)))

    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(wait, i)
            await trio.testing.wait_all_tasks_blocked()
        pool.grow_ended()  # one start failed: one waiter too many
        pool.dismiss_excess_waiters()
        await trio.testing.wait_all_tasks_blocked()
        assert order == [(1, None)] and pool.queued == 1
        pool.grow_ended()
        pool.offer("b")  # the oldest waiter is still served
    assert order == [(1, None), (0, "b")]


def test_plan_grow_follows_demand_up_to_max_of_target_and_capacity() -> None:
    pool: WarmPool[str] = WarmPool("py", 1)
    assert pool.plan_grow(live=1, capacity=3) and pool.growing == 1
    assert pool.plan_grow(live=1, capacity=3) and pool.growing == 2
    assert not pool.plan_grow(live=1, capacity=3)  # 1 live + 2 growing = max(1, 3)
    pool.grow_ended()
    assert pool.growing == 1
    big: WarmPool[str] = WarmPool("js", 4)
    assert big.plan_grow(live=3, capacity=2)  # the target bounds when above capacity
    assert not big.plan_grow(live=3, capacity=2)


def test_make_room_takes_the_longest_warm_item_of_the_language_most_over_target() -> None:
    pools: WarmPools[str] = WarmPools({"py": 1, "js": 0, "bash": 0})
    for item in ("p1", "p2", "p3"):
        pools["py"].offer(item)
    pools["js"].offer("j1")
    assert not pools.may_keep("bash", capacity=3)  # 2 py + 1 js extras use the allowance
    assert pools.make_room("bash") == "p1"  # py is 2 over its target, js 1: py's oldest goes
    assert list(pools["py"].ready) == ["p2", "p3"]
    assert pools.may_keep("bash", capacity=3)
    assert pools.make_room("py") == "j1"  # never from the language asking
    assert pools.make_room("py") is None and pools.make_room("js") == "p2"
    assert WarmPools[str]({"py": 1}).make_room("py") is None
