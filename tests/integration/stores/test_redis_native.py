"""The Trio-native Redis client (``backends/redis_resp.py``) against a real redis-server.

The conformance matrix (``test_store_conformance.py``) runs every session-store contract on the
store with the native client (``redis``) and without it (``redis-bridged``). Here: what is specific
to the native client — that the store really uses it, scripts the server forgot, credentials and
databases, a restart, an outage, cancellation in the middle of a reply, and its pool bound — each
compared with what the redis-py path does where both apply.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from kcr_trio.backends.redis_resp import NativeTarget, RespConnectionError, RespPool
from kcr_trio.backends.redis_sessions import open_redis_sessions
from kcr_trio.core.errors import Unavailable
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FileRecord, utcnow
from tests.support.redis_server import RedisServer, unique_prefix


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def _pool(server: RedisServer, **kw: object) -> RespPool:
    values: dict[str, object] = {"max_connections": 4, "pool_timeout": 2.0, "socket_timeout": 5.0,
                                 "connect_timeout": 2.0}
    values.update(kw)
    return RespPool(NativeTarget(server.host, server.port, None, None, 0), **values)  # type: ignore[arg-type]


async def wait_for(predicate, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_hot_reads_use_the_native_client_and_agree_with_redis_py(bridge, redis_server, store_settings) -> None:
    prefix = unique_prefix()
    async with open_redis_sessions(store_settings, redis_server.settings(prefix)) as native, \
            open_redis_sessions(store_settings, redis_server.settings(prefix, kcr_redis_native=False)) as bridged:
        assert native.pool_stats()["native_max"] == 20 and "native_max" not in bridged.pool_stats()
        session = await bridged.create_session(entity_id="e", user_id="u")
        rec = FileRecord(session.session_id, new_id(), "a é.txt", "text/plain", 5, utcnow(), "upload")
        await bridged.add_file(rec)

        got = await native.get_session(session.session_id)
        assert native.pool_stats()["native_idle"] == 1  # the read went over the native connection
        assert got is not None and got.session_id == session.session_id and got.metadata == {"entity_id": "e", "user_id": "u"}
        assert await native.get_file(rec.session_id, rec.file_id) == await bridged.get_file(rec.session_id, rec.file_id)
        files, live = await native.list_files_and_session(session.session_id)
        files_b, live_b = await bridged.list_files_and_session(session.session_id)
        assert files == files_b == [rec] and live is not None and live_b is not None
        assert (await native.get_session("missing"), await native.get_file(rec.session_id, "nope")) == (None, None)
        assert native.pool_stats()["in_use"] == 0


async def test_a_script_the_server_forgot_is_sent_again(bridge, own_redis, store_settings) -> None:
    async with open_redis_sessions(store_settings, own_redis.settings("s:")) as store:
        session = await store.create_session(entity_id=None, user_id=None)
        assert await store.get_session(session.session_id) is not None
        assert own_redis.command("SCRIPT", "FLUSH") == b"+OK"
        got = await store.get_session(session.session_id)  # EVALSHA -> NOSCRIPT -> EVAL
        assert got is not None and got.session_id == session.session_id
        assert (await store.list_files_and_session(session.session_id))[1] is not None


async def test_password_and_database(bridge, own_redis, store_settings) -> None:
    assert own_redis.command("CONFIG", "SET", "requirepass", "s3cr:t") == b"+OK"
    base = f"redis://:s3cr%3At@{own_redis.host}:{own_redis.port}/3"
    async with open_redis_sessions(store_settings, own_redis.settings("p:", redis_url=base)) as store:
        session = await store.create_session(entity_id=None, user_id=None)  # redis-py, db 3
        got = await store.get_session(session.session_id)  # native: AUTH, SELECT 3
        assert got is not None and got.session_id == session.session_id
    for native in (True, False):
        wrong = own_redis.settings("p:", redis_url=base.replace("s3cr%3At", "wrong"), kcr_redis_native=native)
        async with open_redis_sessions(store_settings, wrong) as store:
            with pytest.raises(Unavailable) as info:
                await store.get_session("x")
            assert info.value.message == "Session store unavailable: Redis rejected the credentials", native


async def test_restart_and_outage(bridge, own_redis, store_settings) -> None:
    rs = own_redis.settings("r:", redis_socket_connect_timeout=1.0, kcr_redis_pool_timeout=1.0)
    async with open_redis_sessions(store_settings, rs) as store:
        session = await store.create_session(entity_id=None, user_id=None)
        assert await store.get_session(session.session_id) is not None
        await trio.to_thread.run_sync(own_redis.stop)
        for _ in range(2):  # the same message as the redis-py path gives (test_faults.py)
            with pytest.raises(Unavailable, match=r"^Session store unavailable: cannot connect to Redis$"):
                await store.get_session(session.session_id)
        await trio.to_thread.run_sync(own_redis.start)  # no persistence: the data is gone
        assert await store.get_session(session.session_id) is None  # stale connections dropped, retried
        assert store.pool_stats()["in_use"] == 0


async def test_cancelled_mid_reply_drops_the_connection(own_redis) -> None:
    pool = _pool(own_redis)
    key = f"q{new_id()}"

    def blocked() -> bool:
        return "cmd=blpop" in _client_list(own_redis)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "BLPOP", key, "0")
            await wait_for(blocked, "BLPOP reached Redis")
            scope.cancel()
    assert pool.stats() == {"in_use": 0, "idle": 0, "max": 4}  # sent, reply unread: not reusable
    assert own_redis.command("RPUSH", key, "late") == b":1"  # nobody is blocked on it any more
    assert await pool.execute("LPOP", key) == "late"  # a fresh connection gets its own reply
    assert await pool.execute("PING") == "PONG"
    assert pool.stats()["idle"] == 1
    await pool.aclose()


async def test_pool_is_bounded(own_redis) -> None:
    pool = _pool(own_redis, max_connections=2, pool_timeout=0.2)
    key = f"q{new_id()}"
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(pool.execute, "BLPOP", key, "0")
        await wait_for(lambda: pool.stats()["in_use"] == 2, "both connections in use")
        with pytest.raises(RespConnectionError, match="no connection available"):
            await pool.execute("PING")
        own_redis.command("RPUSH", key, "a", "b")  # releases both
    assert pool.stats() == {"in_use": 0, "idle": 2, "max": 2}
    await pool.aclose()


def _client_list(server: RedisServer) -> str:
    import socket

    with socket.create_connection((server.host, server.port), timeout=2) as s:
        s.sendall(b"*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n")
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n")
        while len(body) < int(head[1:]) + 2:  # the bulk reply and its CRLF
            body += s.recv(65536)
    return body.decode().lower()


async def test_replies_whole_in_one_read_and_streamed_agree(own_redis) -> None:
    """A short reply is parsed from one read (``redis_resp.parse``); one larger than a read
    (64 KiB) is read element by element as it arrives. Both give what was stored, nested arrays,
    integers, nulls and error replies included, and the connection stays usable."""
    pool = _pool(own_redis, max_connections=1)
    big = "é" * 150_000  # 300 kB of UTF-8: several reads
    fields = {f"f{i}": ("x" * i) for i in range(50)}
    await pool.execute("SET", "k:big", big)
    await pool.execute("HSET", "k:h", *[item for pair in fields.items() for item in pair])
    await pool.execute("HSET", "k:h2", "big", big)
    assert await pool.execute("GET", "k:big") == big
    assert await pool.execute("GET", "k:none") is None
    assert await pool.execute("INCR", "k:n") == 1
    flat = await pool.execute("HGETALL", "k:h")
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == fields
    nested = await pool.execute("EVAL", "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), 7}",
                                2, "k:h", "k:h2")
    assert dict(zip(nested[0][::2], nested[0][1::2], strict=True)) == fields and nested[1] == ["big", big]
    assert nested[2] == 7
    with pytest.raises(Exception, match="WRONGTYPE"):
        await pool.execute("GET", "k:h")
    assert await pool.execute("PING") == "PONG" and pool.stats()["idle"] == 1
    await pool.aclose()
