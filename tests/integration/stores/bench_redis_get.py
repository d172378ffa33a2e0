"""Benchmark: ``RedisSessionStore.get_session`` through the trio-asyncio bridge (not a test).

Starts its own redis-server on a free port, creates sessions, then for each run measures
get_session calls per second for a fixed time, with 1 caller and with N concurrent callers.
Prints every run and the median::

    python3 -m tests.integration.stores.bench_redis_get [--runs 5] [--seconds 2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from kcr_trio.backends.aio_bridge import open_bridge
from kcr_trio.backends.redis_sessions import open_redis_sessions
from kcr_trio.config import Settings
from tests.support.redis_server import running_redis


async def measure(store, sids: list[str], seconds: float, concurrency: int) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal count
        i = offset
        while time.perf_counter() < deadline:
            got = await store.get_session(sids[i % len(sids)])
            assert got is not None
            count += 1
            i += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            nursery.start_soon(caller, c)
    return count / (time.perf_counter() - start)


async def main(runs: int, seconds: float, concurrency: int) -> None:
    with running_redis() as server:
        async with open_bridge():
            async with open_redis_sessions(Settings(session_ttl_hours=0), server.settings("bench:")) as store:  # type: ignore[arg-type]
                sids = [(await store.create_session(entity_id=None, user_id=None)).session_id for _ in range(100)]
                await measure(store, sids, 0.5, concurrency)  # warm-up: fill the pool, load the script
                for c in (1, concurrency):
                    rates = [await measure(store, sids, seconds, c) for _ in range(runs)]
                    print(
                        f"get_session via bridge, {c:>2} caller(s): "
                        + ", ".join(f"{r:,.0f}" for r in rates)
                        + f" ops/s; median {statistics.median(rates):,.0f} ops/s"
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    trio.run(main, args.runs, args.seconds, args.concurrency)
