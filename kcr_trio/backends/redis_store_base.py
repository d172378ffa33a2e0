"""The Redis session store's base: its client, key layout and plumbing, and its upkeep side.

:class:`RedisStoreBase` holds what every operation of ``backends.redis_sessions.RedisSessionStore``
stands on — the redis-py client and its ``RedisHandle`` (deadline and error mapping through the
asyncio bridge, the Trio-native pool for the hot reads), KubeCodeRun's key names, the MULTI/cluster
pipeline rule — and the operations that are not about session and file *records*: the rate-limit
counters and locks, the readiness ping, the cleanup loop's support (``expired_sessions``,
``forget_session``, see ``backends/session_cleanup.py``) and the pool figures. The records
themselves (sessions, entity lookup, file metadata, the ``/files`` listing) are in
``redis_sessions``. The split keeps both modules short; there is one store class, and the
cancellation and error rules of ``redis_sessions``' docstring hold for every method here too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from kcr_trio.backends.redis_client import RedisHandle
from kcr_trio.backends.redis_resp import RespPool, Script
from kcr_trio.backends.redis_schema import FILES_AND_TOUCH, GET_AND_TOUCH, UNLOCK, parse_time
from kcr_trio.core.model import FOREVER, utcnow

T = TypeVar("T")

_EXPIRED_SCAN_LIMIT = 5000  # sessions returned per cleanup pass


class RedisStoreBase:
    """Client, keys, plumbing and upkeep of the Redis session store (module docstring)."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        ttl_hours: int,
        cluster: bool,
        op_timeout: float,
        max_connections: int = 20,
        native: RespPool | None = None,
    ) -> None:
        # The client as every store on it uses it (the PTC store is given this handle).
        self.redis = RedisHandle(client, prefix, cluster, op_timeout,
                                 trio.CapacityLimiter(max_connections) if cluster else None, native)
        # The hot reads (get_session, get_file, the /files listing) go to the Trio-native client
        # when there is one (standalone, plain TCP: ``backends/redis_resp.py``).
        self._native = native
        self._r = client
        self.prefix = prefix
        self._ttl = int(ttl_hours) * 3600
        self._cluster = cluster
        self._touch_script = client.register_script(GET_AND_TOUCH)
        self._files_script = client.register_script(FILES_AND_TOUCH)
        self._unlock_script = client.register_script(UNLOCK)

    # --- keys ------------------------------------------------------------------------------------
    def session_key(self, sid: str) -> str:
        return f"{self.prefix}sessions:{sid}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}sessions:index"

    def entity_key(self, eid: str) -> str:
        return f"{self.prefix}entity_sessions:{eid}"

    def file_key(self, sid: str, fid: str) -> str:
        return f"{self.prefix}files:{sid}:{fid}"

    def session_files_key(self, sid: str) -> str:
        return f"{self.prefix}session_files:{sid}"

    def _pipeline(self) -> Any:
        # MULTI where every key can live on one server; a plain pipeline in cluster mode.
        return self._r.pipeline(transaction=not self._cluster)

    async def _flush_record_first(self, pipe: Any) -> Any:
        """In cluster mode, write the record before its index entries: a cluster pipeline runs
        per node, so without this an index could briefly list a record that does not exist yet
        (and a concurrent cleanup would take it for an orphan). With MULTI, keep queueing."""
        if not self._cluster:
            return pipe
        await pipe.execute()
        return self._pipeline()

    # --- plumbing --------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one asyncio coroutine function against Redis with a deadline and error mapping."""
        return await self.redis.run(fn)

    async def _script(self, script: Script, registered: Any, keys: list[str], args: list[str]) -> Any:
        """A read script on the native client if there is one, else redis-py's registered twin."""
        if self._native is not None:
            return await self.redis.run_native(lambda r: r.evalsha(script, keys, args))
        return await self._run(lambda: registered(keys=keys, args=args))

    # --- limits, locks, readiness ---------------------------------------------------------------
    async def hit(self, key: str, window_seconds: int) -> int:
        window = max(1, int(window_seconds))
        rkey = f"{self.prefix}kcr:rl:{key}:{int(time.time() // window)}"

        async def op() -> int:
            pipe = self._r.pipeline(transaction=False)  # one key: no MULTI needed
            pipe.incr(rkey)
            pipe.expire(rkey, window + 1)
            count, _ = await pipe.execute()
            return int(count)

        return await self._run(op)

    async def try_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        rkey = f"{self.prefix}kcr:lock:{key}"
        ttl_ms = max(1, int(ttl_seconds * 1000))
        return bool(await self._run(lambda: self._r.set(rkey, owner, nx=True, px=ttl_ms)))

    async def unlock(self, key: str, owner: str) -> None:
        rkey = f"{self.prefix}kcr:lock:{key}"
        await self._run(lambda: self._unlock_script(keys=[rkey], args=[owner]))

    async def ping(self) -> dict[str, Any]:
        start = time.perf_counter()
        await self._run(self._r.ping)
        return {
            "backend": "redis",
            "mode": "cluster" if self._cluster else "standalone/sentinel",
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    # --- cleanup support (see backends/session_cleanup.py) ----------------------------------------
    async def expired_sessions(self) -> list[str]:
        """Ids in ``sessions:index`` whose hash is gone or whose ``expires_at`` has passed.

        At most ``_EXPIRED_SCAN_LIMIT`` per call; the cleanup loop comes back for the rest.
        """

        async def op() -> list[str]:
            now = utcnow()
            found: list[str] = []
            cursor = 0
            while True:
                cursor, members = await self._r.sscan(self.index_key, cursor, count=500)
                members = [m for m in members if m]
                if members:
                    pipe = self._r.pipeline(transaction=False)
                    for sid in members:
                        pipe.hmget(self.session_key(sid), "session_id", "expires_at")
                    for sid, (hid, expires) in zip(members, await pipe.execute(), strict=True):
                        if not hid or parse_time(expires, FOREVER) < now:
                            found.append(sid)
                if cursor == 0 or len(found) >= _EXPIRED_SCAN_LIMIT:
                    return list(dict.fromkeys(found))[:_EXPIRED_SCAN_LIMIT]

        return await self._run(op)

    async def forget_session(self, session_id: str) -> None:
        """Remove the session's hash, index and entity memberships and file index (idempotent).

        Call after its files' metadata and bytes are gone. The entity id is read from the hash; if
        the hash already expired, ``find_entity_session`` prunes the stale entity entry later.
        """

        async def op() -> None:
            raw = await self._r.hget(self.session_key(session_id), "metadata")
            try:
                entity_id = (json.loads(raw or "{}") or {}).get("entity_id")
            except (ValueError, AttributeError):
                entity_id = None
            pipe = self._pipeline()
            pipe.delete(self.session_files_key(session_id))
            pipe.delete(self.session_key(session_id))
            pipe.srem(self.index_key, session_id)
            if entity_id:
                pipe.srem(self.entity_key(str(entity_id)), session_id)
            await pipe.execute()

        await self._run(op)

    def pool_stats(self) -> dict[str, int]:
        """In-use and idle connections of the standalone/sentinel pool (tests assert on this).
        ``in_use`` counts the native client's too; its own are ``native_idle`` and ``native_max``."""
        pool = getattr(self._r, "connection_pool", None)
        if pool is None:
            return {}
        stats = {"in_use": len(getattr(pool, "_in_use_connections", ())),
                 "idle": len(getattr(pool, "_available_connections", ())),
                 "max": int(getattr(pool, "max_connections", 0))}
        if self._native is not None:
            native = self._native.stats()
            stats["in_use"] += native["in_use"]
            stats["native_idle"], stats["native_max"] = native["idle"], native["max"]
        return stats
