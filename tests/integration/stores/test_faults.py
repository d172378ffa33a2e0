"""Dependencies failing under load: redis-server stopped and restarted while requests run, the S3
server stopped and started. Expected: clear ``Unavailable`` errors (the edge's 503), nothing else,
no hang, no half-visible records, and recovery without intervention."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import trio

from kcr_trio.backends.redis_sessions import RedisSessionStore, open_redis_sessions
from kcr_trio.backends.s3_files import S3FileStore, open_s3_files
from kcr_trio.config import Settings
from kcr_trio.core.errors import NotFound, Unavailable
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FileRecord, utcnow
from tests.support.redis_server import RedisServer, running_redis
from tests.support.s3_server import S3Server, running_s3

WORKERS = 16


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
async def fragile_redis(bridge, own_redis: RedisServer) -> AsyncIterator[RedisSessionStore]:
    rs = own_redis.settings(
        "f:", redis_max_connections=8, redis_socket_timeout=1.0, redis_socket_connect_timeout=1.0, kcr_redis_pool_timeout=1.0
    )
    async with open_redis_sessions(Settings(session_ttl_hours=0), rs) as store:  # type: ignore[arg-type]
        yield store


@pytest.fixture
async def fragile_s3(bridge, own_s3: S3Server) -> AsyncIterator[S3FileStore]:
    s3 = own_s3.settings("kcr-faults", kcr_s3_connect_timeout=1.0, kcr_s3_read_timeout=2.0)
    async with open_s3_files(Settings(), s3) as store:  # type: ignore[arg-type]
        yield store


async def wait_until(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def _one(data: bytes):
    yield data


async def test_redis_restart_under_load(fragile_redis: RedisSessionStore, own_redis: RedisServer) -> None:
    store = fragile_redis
    outcomes: Counter[str] = Counter()
    unexpected: list[BaseException] = []
    slowest_failure = 0.0

    async def worker(n: int) -> None:
        nonlocal slowest_failure
        while True:
            t0 = time.perf_counter()
            try:
                s = await store.create_session(entity_id=f"ent-{n}", user_id=None)
                await store.add_file(FileRecord(s.session_id, new_id(), "a.txt", "text/plain", 1, utcnow(), "upload"))
                got = await store.get_session(s.session_id)
                assert got is not None and got.session_id == s.session_id
                assert len(await store.list_files(s.session_id)) == 1
                outcomes["ok"] += 1
            except Unavailable as exc:
                assert exc.status == 503 and exc.message.startswith("Session store unavailable: "), exc.message
                assert "127.0.0.1" not in exc.message and str(own_redis.port) not in exc.message  # no internals
                outcomes["unavailable"] += 1
                slowest_failure = max(slowest_failure, time.perf_counter() - t0)
                await trio.sleep(0.005)  # a client backing off a little
            except Exception as exc:  # anything else is a bug
                unexpected.append(exc)
                outcomes["unexpected"] += 1

    async with trio.open_nursery() as nursery:
        for n in range(WORKERS):
            nursery.start_soon(worker, n)
        await wait_until(lambda: outcomes["ok"] >= 100, 10, "healthy traffic")

        await trio.to_thread.run_sync(own_redis.stop)
        await wait_until(lambda: outcomes["unavailable"] >= 50, 10, "503s while Redis is down")
        with pytest.raises(Unavailable):
            await store.ping()  # readiness says not ready
        ok_while_down = outcomes["ok"]

        await trio.to_thread.run_sync(own_redis.start)
        await wait_until(lambda: outcomes["ok"] >= ok_while_down + 100, 10, "recovery after restart")
        await store.ping()
        nursery.cancel_scope.cancel()

    print(f"\nredis restart under load: {dict(outcomes)}, slowest 503 {slowest_failure * 1000:.0f} ms")
    assert not unexpected, unexpected[:3]
    assert slowest_failure < 3.5  # bounded by connect timeout + pool wait, never a hang
    assert store.pool_stats()["in_use"] == 0

    # Nothing half-written: every indexed session and file record is complete.
    raw = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        for sid in raw.smembers("f:sessions:index"):
            h = raw.hgetall(f"f:sessions:{sid}")
            assert h.get("session_id") == sid and h.get("status") == "active" and "metadata" in h, (sid, h)
        for key in raw.scan_iter(match="f:session_files:*"):
            sid = key.split(":", 2)[2]
            for fid in raw.smembers(key):
                h = raw.hgetall(f"f:files:{sid}:{fid}")
                # MULTI: the record and its index entry appear together, or not at all.
                assert h.get("object_key") == f"sessions/{sid}/uploads/{fid}", (key, fid, h)
    finally:
        raw.close()


async def test_redis_down_at_start_up_then_up(bridge) -> None:
    server = RedisServer()  # chosen port, not started yet
    try:
        rs = server.settings("s:", redis_socket_connect_timeout=1.0, kcr_redis_pool_timeout=1.0)
        async with open_redis_sessions(Settings(), rs) as store:  # type: ignore[arg-type]
            with pytest.raises(Unavailable, match=r"^Session store unavailable: cannot connect to Redis$"):
                await store.ping()
            with pytest.raises(Unavailable):
                await store.create_session(entity_id=None, user_id=None)
            await trio.to_thread.run_sync(server.start)
            s = await store.create_session(entity_id=None, user_id=None)
            assert (await store.get_session(s.session_id)) is not None
            await store.ping()
    finally:
        server.close()


async def test_s3_down_and_back(fragile_s3: S3FileStore, own_s3: S3Server, bridge, redis_server) -> None:
    files = fragile_s3
    rs = redis_server.settings(f"s3f{new_id()}:")
    async with open_redis_sessions(Settings(), rs) as sessions:  # type: ignore[arg-type]
        session = await sessions.create_session(entity_id=None, user_id=None)

        async def upload(data: bytes) -> FileRecord:
            """The core's order: bytes first, metadata last."""
            rec = FileRecord(session.session_id, new_id(), "f.bin", "application/octet-stream", len(data), utcnow(), "upload")
            await files.put(rec.object_key, _one(data), content_type=rec.content_type)
            await sessions.add_file(rec)
            return rec

        kept = await upload(b"before the outage")
        await trio.to_thread.run_sync(own_s3.stop)

        with pytest.raises(Unavailable) as info:
            await files.ping()
        assert info.value.message == "File store unavailable: cannot connect to S3", info.value.message
        t0 = time.perf_counter()
        for _attempt in range(5):
            with pytest.raises(Unavailable, match="File store unavailable"):
                await upload(os.urandom(50_000))
            with pytest.raises(Unavailable, match="File store unavailable"):
                async with files.open(kept.object_key):
                    pass
            with pytest.raises(Unavailable, match="File store unavailable"):
                await files.delete(kept.object_key)
            with pytest.raises(Unavailable, match="File store unavailable"):
                await files.ping()
        assert time.perf_counter() - t0 < 10  # each failure is quick (connection refused)
        # No metadata for bytes that never landed.
        assert [r.file_id for r in await sessions.list_files(session.session_id)] == [kept.file_id]
        assert files.pool_stats()["in_use"] == 0

        # A fresh, empty S3 comes back (moto keeps nothing): the bucket is re-created on demand.
        await trio.to_thread.run_sync(own_s3.start)
        await files.ping()
        with pytest.raises(NotFound):
            async with files.open(kept.object_key):
                pass
        again = await upload(b"after the outage")
        async with files.open(again.object_key) as body:
            assert b"".join([c async for c in body]) == b"after the outage"
        assert own_s3.list_keys("kcr-faults") == [again.object_key]


async def test_s3_dies_mid_download(fragile_s3: S3FileStore, own_s3: S3Server) -> None:
    files = fragile_s3
    payload = os.urandom(8 * 1024 * 1024)
    key = "sessions/mid/outputs/f"

    async def gen():
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    await files.put(key, gen(), content_type="application/octet-stream")
    received = 0
    error: BaseException | None = None
    with trio.fail_after(10):  # never a hang
        try:
            async with files.open(key) as body:
                async for chunk in body:
                    if received == 0:
                        await trio.to_thread.run_sync(own_s3.kill)
                    received += len(chunk)
        except Unavailable as exc:
            error = exc
    print(f"\ns3 killed mid-download: received {received} of {len(payload)}, error={error!r}")
    # Either the rest was already in flight (socket buffers) and arrived whole, or the stream
    # ended with a clear Unavailable; never a silent short read.
    assert (error is None and received == len(payload)) or (error is not None and received < len(payload))
    assert files.pool_stats()["in_use"] == 0
