"""The rate limiter over a shared store: per-key windows, per-IP auth-failure blocks, replicas."""

from __future__ import annotations

import pytest

from kcr_trio.api.ratelimit import RateLimited, RateLimiter, key_id
from kcr_trio.backends.memory_sessions import MemorySessionStore


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_per_key_minute_limit_and_headers() -> None:
    store, clock = MemorySessionStore(), Clock(1_000_020.0)  # exactly at the start of a minute window
    limiter = RateLimiter(store, per_minute=2, clock=clock)
    first = await limiter.check_key("k1")
    assert first[0].headers(clock())["X-RateLimit-Remaining"] == "1"
    await limiter.check_key("k1")
    with pytest.raises(RateLimited) as info:
        await limiter.check_key("k1")
    exc = info.value
    assert exc.status == 429 and exc.shape == "A" and exc.limit == "minute"
    assert exc.message == "Rate limit exceeded for minute. Limit: 2, Used: 3"
    assert exc.headers["X-RateLimit-Reset"] == "1000080" and exc.headers["Retry-After"] == "60"
    assert (await limiter.check_key("k2"))[0].used == 1  # keys are counted apart


async def test_keys_are_counted_under_a_hash() -> None:
    store = MemorySessionStore()
    await RateLimiter(store, per_hour=5).check_key("super-secret-key")
    assert all("super-secret-key" not in key for key in store._counters)
    assert any(key_id("super-secret-key") in key for key in store._counters)


async def test_auth_failures_block_an_ip_until_the_window_ends() -> None:
    store, clock = MemorySessionStore(), Clock(1_999_990.0)  # 10 s into the window [1_999_980, 2_000_040)
    limiter = RateLimiter(store, auth_failures_per_minute=3, clock=clock)
    for _ in range(2):
        await limiter.auth_failed("10.0.0.1")
        limiter.check_blocked("10.0.0.1")  # not yet
    await limiter.auth_failed("10.0.0.1")
    with pytest.raises(RateLimited) as info:
        limiter.check_blocked("10.0.0.1")
    assert info.value.limit == "auth_failures" and info.value.headers["Retry-After"] == "50"
    limiter.check_blocked("10.0.0.2")  # another address is not affected
    limiter.check_blocked(None)
    clock.now = 2_000_040.0  # the next window
    limiter.check_blocked("10.0.0.1")


async def test_replicas_sharing_a_store_block_together() -> None:
    store = MemorySessionStore()  # stands for Redis: both replicas count into it
    a, b = RateLimiter(store, auth_failures_per_minute=4), RateLimiter(store, auth_failures_per_minute=4)
    for replica in (a, b, a):
        await replica.auth_failed("10.1.1.1")
    a.check_blocked("10.1.1.1")
    b.check_blocked("10.1.1.1")
    await b.auth_failed("10.1.1.1")  # the fourth failure, seen by b: b blocks at once
    with pytest.raises(RateLimited):
        b.check_blocked("10.1.1.1")
    await a.auth_failed("10.1.1.1")  # a learns it at its next failure: one extra attempt at most
    with pytest.raises(RateLimited):
        a.check_blocked("10.1.1.1")


async def test_inactive_limiter_costs_nothing() -> None:
    limiter = RateLimiter(MemorySessionStore())
    assert not limiter.active
    assert await limiter.check_key("k") == []
    await limiter.auth_failed("10.0.0.1")
    limiter.check_blocked("10.0.0.1")


async def test_a_broken_or_stuck_store_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    import trio

    from kcr_trio.api import ratelimit

    monkeypatch.setattr(ratelimit, "STORE_TIMEOUT", 0.05)

    class Broken(MemorySessionStore):
        async def hit(self, key: str, window_seconds: int) -> int:
            raise RuntimeError("redis went away")

    class Stuck(MemorySessionStore):
        async def hit(self, key: str, window_seconds: int) -> int:
            await trio.sleep_forever()
            raise AssertionError

    for store in (Broken(), Stuck()):
        limiter = RateLimiter(store, per_minute=1, auth_failures_per_minute=1)
        for _ in range(3):
            assert await limiter.check_key("k") == []
            await limiter.auth_failed("10.0.0.1")
        limiter.check_blocked("10.0.0.1")
