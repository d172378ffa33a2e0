"""Where PTC execution state lives: in process (one replica), or in Redis (shared by replicas).

Keys (behind ``REDIS_KEY_PREFIX``; KubeCodeRun never reads them)::

    kcr:ptc:exec:{execution_id}    STRING  PtcState JSON            TTL = token lifetime (+ margin)
    kcr:ptc:req:{request_id}       STRING  {principal, execution_id, status}   TTL = token lifetime
    kcr:ptc:replica:{replica_id}   STRING  the replica's internal URL         TTL = a few heartbeats
    kcr:ptc:claim:{eid}:{gen}      STRING  replica id (SET NX: one replica takes an orphan over)

The execution key is what makes a continuation work on any replica: the owner's URL is in it (the
continuation is forwarded there), and when the owner's heartbeat key is gone the state holds
everything a replay needs. Failures surface as ``Unavailable`` (503), as for sessions.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from kcr_trio.core.interfaces import PtcStore
from kcr_trio.core.ptc_state import PtcState

if TYPE_CHECKING:
    # Only for the annotation: the Redis client (and trio-asyncio under it) is the optional ``prod``
    # extra, and the embedded default imports this module for ``MemoryPtcStore`` after a plain
    # ``pip install .``.
    from kcr_trio.backends.redis_client import RedisHandle

__all__ = ["MemoryPtcStore", "PtcStore", "RedisPtcStore"]


class MemoryPtcStore:
    """One replica: everything in a dict with expiry times."""

    shared = False

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, Any]] = {}

    def _get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None or item[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return item[1]

    def _put(self, key: str, value: Any, ttl: float) -> None:
        self._data[key] = (time.monotonic() + ttl, value)
        if len(self._data) > 10000:  # drop expired entries now and then
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] >= now}

    async def save(self, state: PtcState, ttl: float) -> None:
        self._put("e:" + state.execution_id, state.to_json(), ttl)

    async def load(self, execution_id: str) -> PtcState | None:
        raw = self._get("e:" + execution_id)
        return PtcState.from_json(raw) if raw is not None else None

    async def delete(self, execution_id: str) -> None:
        self._data.pop("e:" + execution_id, None)

    async def claim(self, execution_id: str, generation: int, replica: str) -> bool:
        key = f"c:{execution_id}:{generation}"
        if self._get(key) is not None:
            return False
        self._put(key, replica, 60)
        return True

    async def add_request(self, request_id: str, record: dict[str, Any], ttl: float) -> dict[str, Any] | None:
        existing = self._get("r:" + request_id)
        if existing is not None:
            return dict(existing)
        self._put("r:" + request_id, dict(record), ttl)
        return None

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        found = self._get("r:" + request_id)
        return dict(found) if found is not None else None

    async def set_request(self, request_id: str, record: dict[str, Any], ttl: float) -> None:
        self._put("r:" + request_id, dict(record), ttl)

    async def heartbeat(self, replica: str, url: str, ttl: float) -> None:
        return None

    async def alive(self, replica: str) -> bool:
        return True


class RedisPtcStore:
    """Shared by every replica on one Redis. It runs on the session store's client: given that
    store's :class:`~kcr_trio.backends.redis_client.RedisHandle`, its keys share the prefix and
    its operations the deadline, pool and error mapping (``Session store unavailable``, 503)."""

    shared = True

    def __init__(self, redis: RedisHandle) -> None:
        self._redis = redis
        self._r = redis.client
        self._p = redis.prefix + "kcr:ptc:"

    async def save(self, state: PtcState, ttl: float) -> None:
        data, key = state.to_json(), self._p + "exec:" + state.execution_id
        await self._redis.run(lambda: self._r.set(key, data, px=_ms(ttl)))

    async def load(self, execution_id: str) -> PtcState | None:
        key = self._p + "exec:" + execution_id
        raw = await self._redis.run(lambda: self._r.get(key))
        return PtcState.from_json(raw) if raw else None

    async def delete(self, execution_id: str) -> None:
        key = self._p + "exec:" + execution_id
        await self._redis.run(lambda: self._r.delete(key))

    async def claim(self, execution_id: str, generation: int, replica: str) -> bool:
        key = f"{self._p}claim:{execution_id}:{generation}"
        return bool(await self._redis.run(lambda: self._r.set(key, replica, nx=True, ex=60)))

    async def add_request(self, request_id: str, record: dict[str, Any], ttl: float) -> dict[str, Any] | None:
        key, data = self._p + "req:" + request_id, json.dumps(record)
        if await self._redis.run(lambda: self._r.set(key, data, nx=True, px=_ms(ttl))):
            return None
        return await self.get_request(request_id) or {}

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        key = self._p + "req:" + request_id
        raw = await self._redis.run(lambda: self._r.get(key))
        found: dict[str, Any] | None = json.loads(raw) if raw else None
        return found

    async def set_request(self, request_id: str, record: dict[str, Any], ttl: float) -> None:
        key, data = self._p + "req:" + request_id, json.dumps(record)
        await self._redis.run(lambda: self._r.set(key, data, px=_ms(ttl)))

    async def heartbeat(self, replica: str, url: str, ttl: float) -> None:
        key = self._p + "replica:" + replica
        await self._redis.run(lambda: self._r.set(key, url, px=_ms(ttl)))

    async def alive(self, replica: str) -> bool:
        key = self._p + "replica:" + replica
        return bool(await self._redis.run(lambda: self._r.exists(key)))


def _ms(ttl: float) -> int:
    """A TTL in whole milliseconds, at least one (Redis refuses ``PX 0``)."""
    return max(1, int(ttl * 1000))
