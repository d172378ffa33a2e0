"""Cancellation storms: thousands of store operations and downloads cancelled at random points,
with many more callers than pooled connections. Afterwards the pools hold nothing, answer at once,
and no reply ends up with the wrong caller.

The figures (operations started, cancelled, completed; time to recover) are printed; run with
``-s`` to see them.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import trio

from kcr_trio.backends.redis_sessions import RedisSessionStore, open_redis_sessions
from kcr_trio.backends.s3_files import S3FileStore, open_s3_files
from kcr_trio.config import Settings
from kcr_trio.core.model import FileRecord, utcnow
from tests.support.redis_server import unique_prefix
from tests.support.s3_server import S3Server, unique_bucket

REDIS_POOL = 4
S3_POOL = 4
REDIS_OPS = 4000
DOWNLOADS = 1200
CONCURRENCY = 100


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
async def small_redis(request, bridge) -> AsyncIterator[RedisSessionStore]:
    servers = request.getfixturevalue(
        {"standalone": "redis_server", "sentinel": "redis_sentinel", "cluster": "redis_cluster"}[request.param]
    )
    rs = servers.settings(unique_prefix(), redis_max_connections=REDIS_POOL)
    async with open_redis_sessions(Settings(session_ttl_hours=0), rs) as store:  # type: ignore[arg-type]
        yield store


def cluster_in_use(store: RedisSessionStore) -> int:
    """Connections held by callers across all cluster nodes (each node has its own small pool)."""
    nodes = store._r.get_nodes()
    return sum(len(n._connections) - len(n._free) for n in nodes)


@pytest.fixture
async def small_s3(bridge, s3_server: S3Server) -> AsyncIterator[S3FileStore]:
    s3 = s3_server.settings(unique_bucket(), kcr_s3_max_connections=S3_POOL)
    async with open_s3_files(Settings(), s3) as store:  # type: ignore[arg-type]
        yield store


def random_deadlines(max_delay: float):
    """A third cancelled at once (before or right after the request is sent), the rest at random
    points in flight or while waiting for a pooled connection."""
    return lambda i, rng: 0.0 if i % 3 == 0 else rng.uniform(0, max_delay)


def mostly_mid_stream(max_delay: float):
    """A third get a random deadline; the rest cancel themselves (no deadline of their own)."""
    return lambda i, rng: rng.choice([0.0, rng.uniform(0, max_delay)]) if i % 3 == 0 else 60.0


async def _storm(n: int, op, *, seed: int, deadline, concurrency: int = CONCURRENCY) -> Counter[str]:
    """Run ``n`` calls of ``op(i, scope)``, CONCURRENCY at a time, each under a random deadline
    (``op`` may also cancel ``scope`` itself, at a point of its choosing)."""
    rng = random.Random(seed)
    outcome: Counter[str] = Counter()
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int, delay: float) -> None:
        async with limiter:
            with trio.move_on_after(delay) as scope:
                await op(i, scope)
            outcome["cancelled" if scope.cancelled_caught else "completed"] += 1

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i, deadline(i, rng))
    return outcome


async def test_redis_storm_leaves_the_pool_clean(small_redis: RedisSessionStore) -> None:
    store = small_redis
    sessions = [await store.create_session(entity_id=f"ent-{i}", user_id=None) for i in range(20)]
    for s in sessions:
        await store.add_file(FileRecord(s.session_id, f"f-{s.session_id}", "a.txt", "text/plain", 1, utcnow(), "upload"))

    async def op(i: int, scope: trio.CancelScope) -> None:
        s = sessions[i % len(sessions)]
        kind = i % 5
        if kind == 0:
            got = await store.get_session(s.session_id)
            assert got is not None and got.session_id == s.session_id
        elif kind == 1:
            files = await store.list_files(s.session_id)
            assert [f.file_id for f in files] == [f"f-{s.session_id}"]
        elif kind == 2:
            found = await store.find_entity_session(f"ent-{i % len(sessions)}")
            assert found is not None and found.session_id == s.session_id
        elif kind == 3:
            await store.hit(f"storm-{i % 7}", 3600)
        else:
            await store.create_session(entity_id=None, user_id=None)

    # Phase 1: 25x more callers than connections, so most are cancelled while queued for one.
    started = time.perf_counter()
    crowd = await _storm(REDIS_OPS // 2, op, seed=1, deadline=random_deadlines(0.03))
    # Phase 2: as many callers as connections, deadlines of a few round trips: most are cancelled
    # with their command sent and the reply not yet read (the connection must be dropped).
    in_flight = await _storm(REDIS_OPS // 2, op, seed=4, deadline=random_deadlines(0.002), concurrency=REDIS_POOL)
    elapsed = time.perf_counter() - started
    print(f"\nredis storm: {REDIS_OPS} ops, pool {REDIS_POOL}: crowded {dict(crowd)}, in flight {dict(in_flight)}, {elapsed:.2f}s")
    assert crowd["cancelled"] >= 1000 and in_flight["cancelled"] >= 1000
    assert in_flight["completed"] > 0  # the deadlines really land in the middle of operations

    stats = store.pool_stats()
    if stats:
        assert stats["in_use"] == 0, stats
        assert stats["idle"] <= REDIS_POOL
    else:
        assert cluster_in_use(store) == 0
    # The pool answers at once, for more callers than it has connections, each with its own reply.
    t0 = time.perf_counter()
    with trio.fail_after(1.0):
        results: dict[str, str | None] = {}

        async def check(sid: str) -> None:
            got = await store.get_session(sid)
            results[sid] = got.session_id if got else None

        async with trio.open_nursery() as nursery:
            for s in sessions:
                nursery.start_soon(check, s.session_id)
    print(f"redis after storm: {len(sessions)} concurrent reads in {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert results == {s.session_id: s.session_id for s in sessions}
    assert store.pool_stats().get("in_use", 0) == 0


async def test_s3_storm_of_cancelled_downloads_leaves_the_connector_clean(small_s3: S3FileStore) -> None:
    store = small_s3
    payload = os.urandom(1024 * 1024)  # 16 reads of 64 KiB
    key = "sessions/storm/outputs/big"

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    await store.put(key, gen(), content_type="application/octet-stream")
    mid_stream = 0

    async def op(i: int, scope: trio.CancelScope) -> None:
        nonlocal mid_stream
        async with store.open(key) as body:
            async for _chunk in body:
                if i % 3 == 0:
                    await trio.sleep_forever()  # held open until the random deadline fires
                mid_stream += 1
                scope.cancel()  # cancelled mid-stream, 15 of 16 reads still unread
                await trio.lowlevel.checkpoint()

    started = time.perf_counter()
    outcome = await _storm(DOWNLOADS, op, seed=2, deadline=mostly_mid_stream(0.02))
    elapsed = time.perf_counter() - started
    print(f"\ns3 storm: {DOWNLOADS} downloads, pool {S3_POOL}, {dict(outcome)}, {mid_stream} cancelled mid-stream, {elapsed:.2f}s")
    assert outcome["completed"] == 0 and outcome["cancelled"] == DOWNLOADS
    assert mid_stream >= DOWNLOADS // 2

    stats = store.pool_stats()
    assert stats["in_use"] == 0, stats
    t0 = time.perf_counter()
    with trio.fail_after(2.0):
        bodies: list[bytes] = []

        async def fetch() -> None:
            async with store.open(key) as body:
                bodies.append(b"".join([c async for c in body]))

        async with trio.open_nursery() as nursery:
            for _ in range(S3_POOL * 2):
                nursery.start_soon(fetch)
    print(f"s3 after storm: {S3_POOL * 2} full downloads in {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert bodies == [payload] * (S3_POOL * 2)
    assert store.pool_stats()["in_use"] == 0


async def test_s3_storm_of_cancelled_uploads_leaves_nothing_half_visible(small_s3: S3FileStore, s3_server: S3Server) -> None:
    store = small_s3
    payload = os.urandom(300_000)

    async def op(i: int, scope: trio.CancelScope) -> None:
        async def gen() -> AsyncIterator[bytes]:
            for j in range(0, len(payload), 50_000):
                await trio.lowlevel.checkpoint()
                yield payload[j : j + 50_000]

        await store.put(f"sessions/up/uploads/f{i:05d}", gen(), content_type="application/octet-stream")

    outcome = await _storm(300, op, seed=3, deadline=random_deadlines(0.2))
    print(f"\ns3 upload storm: {dict(outcome)}")
    assert outcome["cancelled"] >= 100
    assert store.pool_stats()["in_use"] == 0
    client = s3_server.client()
    for key in s3_server.list_keys(store.bucket, prefix="sessions/up/"):
        # Whatever is visible is complete (one PUT is atomic); cancelled uploads removed theirs.
        assert client.head_object(Bucket=store.bucket, Key=key)["ContentLength"] == len(payload)
    assert len(s3_server.list_keys(store.bucket, prefix="sessions/up/")) <= outcome["completed"]
