"""Sessions and file metadata in Redis, in KubeCodeRun's exact key schema.

KubeCodeRun and kcr-trio can share one Redis (A/B behind one Service): a session created by one is
found, read, listed and cleaned up by the other. Keys (all behind ``REDIS_KEY_PREFIX``, which is
concatenated as is, e.g. ``"kcr:"``)::

    sessions:{sid}          HASH  session_id status created_at last_activity expires_at pod_name
                                  pod_status files working_directory memory_usage_mb
                                  cpu_usage_percent metadata      TTL = SESSION_TTL_HOURS, none if 0
    sessions:index          SET   session ids                      no TTL
    entity_sessions:{eid}   SET   session ids                      no TTL
    files:{sid}:{fid}       HASH  file_id filename content_type object_key session_id created_at
                                  size path type [user_id]         TTL re-applied on every store
    session_files:{sid}     SET   file ids                         same
    kcr:rl:{key}:{window}   STRING counter for ``hit()`` (our own; KubeCodeRun never reads it)

Encodings: UTF-8 strings; timestamps ``datetime.isoformat()`` in UTC (``...+00:00``); ``None`` is
``""``; dicts are JSON; with ``SESSION_TTL_HOURS=0`` sessions get no TTL and ``expires_at`` =
``9999-12-31T23:59:59+00:00``.

Deliberate differences from KubeCodeRun, all invisible to it:

* ``get_session`` refreshes ``last_activity`` with a one-key Lua script that only writes when the
  hash still exists and is active. KubeCodeRun's separate ``HSET`` can resurrect a just-expired
  session as a hash holding only ``last_activity``; readers here treat such a hash as missing.
* ``find_entity_session`` checks *all* members of ``entity_sessions:{eid}`` (KubeCodeRun's set
  accumulates ids of TTL-expired sessions and picking one member can pick a dead one), prefers the
  most recently active live session and prunes ids whose hash is gone.
* Multi-key writes use ``MULTI`` in standalone/sentinel mode (atomic) and plain pipelines in cluster
  mode (keys live in different slots), writing the record before adding it to any index, so a
  reader never finds an index entry for a record that does not exist yet.

Client: redis-py's asyncio client through :mod:`kcr_trio.backends.aio_bridge`, a *bounded* pool
(``REDIS_MAX_CONNECTIONS``; waiting for a free connection is bounded too), short retries, and a
Trio deadline around every operation. No blocking commands are used. Every failure to reach Redis
becomes ``errors.Unavailable("Session store unavailable: ...")``.

Cancellation: each public method is one bridged asyncio task; cancelling the caller cancels it and
waits until redis-py has put the connection back (or dropped it, if a reply was half-read), so a
cancelled call never leaks a pool slot or leaves a reply for the next user of the connection.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse, urlunparse

import trio

from kcr_trio.core.throttle import Throttle
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.backends.aio_bridge import BridgeClosed, BridgeMissing, run_aio
from kcr_trio.config import Settings
from kcr_trio.core.errors import Unavailable
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FOREVER, FileRecord, Session, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

# Session hash fields KubeCodeRun writes, in its order, with its defaults.
_EMPTY_SESSION_FIELDS = {
    "pod_name": "",
    "pod_status": "",
    "files": "{}",
    "working_directory": "/mnt/data",
    "memory_usage_mb": "",
    "cpu_usage_percent": "",
}
_ENTITY_SCAN_LIMIT = 1000  # members of one entity set examined per lookup
_EXPIRED_SCAN_LIMIT = 5000  # sessions returned per cleanup pass

# Release a lock only if its value is still our owner token (a lapsed lock may be someone else's now).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Read a session and, only if it exists and is active, refresh last_activity: one round trip, and
# never creates a hash (HSET on a key that just expired would).
_GET_AND_TOUCH = """
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if h[i] == 'status' then
    if h[i + 1] == 'active' then
      redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
    end
    break
  end
end
return h
"""


class RedisSettings(BaseSettings):
    """KubeCodeRun's Redis variables (3.x names); read only when ``KCR_SESSION_STORE=redis``."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore")

    redis_url: str | None = None  # wins over host/port/password/db
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_password: str | None = None
    redis_db: int = Field(0, ge=0)
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_key_prefix: str = ""
    redis_ssl: bool = False
    redis_ssl_ca_certs: str | None = None
    redis_ssl_certfile: str | None = None
    redis_ssl_keyfile: str | None = None
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    redis_ssl_check_hostname: bool = True
    redis_cluster_nodes: str = ""  # "host:port,host:port"; default: REDIS_HOST:REDIS_PORT
    redis_sentinel_nodes: str = ""  # "host:port,..."; default: REDIS_HOST:26379
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str | None = None
    redis_sentinel_db: int = Field(0, ge=0)
    redis_max_connections: int = Field(20, ge=1)
    redis_socket_timeout: float = Field(5.0, gt=0)
    redis_socket_connect_timeout: float = Field(5.0, gt=0)
    # Ours: longest wait for a free pooled connection before answering 503.
    kcr_redis_pool_timeout: float = Field(5.0, gt=0)

    @field_validator("redis_host", mode="before")
    @classmethod
    def _host_not_url(cls, v: Any) -> Any:
        # A URL pasted into REDIS_HOST (KubeCodeRun tolerates it too).
        if isinstance(v, str) and v.startswith(("redis://", "rediss://")):
            return urlparse(v).hostname or "localhost"
        return v

    @field_validator("redis_password", "redis_sentinel_password", "redis_url", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        # Helm renders unset values as "", not null.
        return None if isinstance(v, str) and not v.strip() else v

    def url(self) -> str:
        """The standalone URL, with ``rediss://`` when ``REDIS_SSL`` is on."""
        if self.redis_url:
            url = self.redis_url
        else:
            auth = f":{self.redis_password}@" if self.redis_password else ""
            url = f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"
        parsed = urlparse(url)
        if self.redis_ssl and parsed.scheme == "redis":
            url = urlunparse(parsed._replace(scheme="rediss"))
        return url

    def tls_kwargs(self) -> dict[str, Any]:
        if not self.redis_ssl and not (self.redis_url or "").startswith("rediss://"):
            return {}
        return {
            "ssl_ca_certs": self.redis_ssl_ca_certs,
            "ssl_certfile": self.redis_ssl_certfile,
            "ssl_keyfile": self.redis_ssl_keyfile,
            "ssl_cert_reqs": self.redis_ssl_cert_reqs,
            "ssl_check_hostname": self.redis_ssl_check_hostname,
        }

    @staticmethod
    def parse_nodes(spec: str, default_port: int) -> list[tuple[str, int]]:
        nodes = []
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            nodes.append((host, int(port) if port else default_port))
        return nodes


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat()


def _parse_time(value: str | None, default: dt.datetime) -> dt.datetime:
    if not value:
        return default
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return default
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _session_from_hash(data: dict[str, str]) -> Session | None:
    """A ``Session`` from a ``sessions:{sid}`` hash, or ``None`` for a hash that is not a session
    (for example one holding only ``last_activity``)."""
    sid, status = data.get("session_id"), data.get("status")
    if not sid or status not in ("active", "idle", "terminated", "error"):
        return None
    now = utcnow()
    try:
        metadata = json.loads(data.get("metadata") or "{}")
    except ValueError:
        metadata = {}
    created = _parse_time(data.get("created_at"), now)
    return Session(
        session_id=sid,
        status=status,  # type: ignore[arg-type]
        created_at=created,
        last_activity=_parse_time(data.get("last_activity"), created),
        expires_at=_parse_time(data.get("expires_at"), FOREVER),
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def _file_from_hash(data: dict[str, str]) -> FileRecord | None:
    sid, fid = data.get("session_id"), data.get("file_id")
    if not sid or not fid:
        return None
    kind = data.get("type")
    if kind not in ("upload", "output"):
        # Presigned-upload records have no type: tell by where the bytes live.
        kind = "output" if "/outputs/" in data.get("object_key", "") else "upload"
    try:
        size = int(data.get("size") or 0)
    except ValueError:
        size = 0
    return FileRecord(
        session_id=sid,
        file_id=fid,
        filename=data.get("filename") or fid,
        content_type=data.get("content_type") or "application/octet-stream",
        size=size,
        created_at=_parse_time(data.get("created_at"), utcnow()),
        kind=kind,  # type: ignore[arg-type]
        owner=data.get("user_id") or None,
    )


def _pairs_to_dict(flat: list[str]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RedisSessionStore:
    """``SessionStore`` on Redis. Build it with :func:`open_redis_sessions`."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        ttl_hours: int,
        cluster: bool,
        op_timeout: float,
        max_connections: int = 20,
    ) -> None:
        self._r = client
        self.prefix = prefix
        self._ttl = int(ttl_hours) * 3600
        self._cluster = cluster
        self._op_timeout = op_timeout
        # redis-py's cluster client fails at once ("Too many connections") when a node's pool is
        # exhausted, where the standalone/sentinel pools wait. Queue cluster operations here
        # instead (one operation holds at most one connection per node), within the deadline.
        self._limiter = trio.CapacityLimiter(max_connections) if cluster else None
        self._touch_script = client.register_script(_GET_AND_TOUCH)
        self._unlock_script = client.register_script(_UNLOCK)

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
        try:
            with trio.fail_after(self._op_timeout):
                if self._limiter is None:
                    return await run_aio(fn)
                async with self._limiter:
                    return await run_aio(fn)
        except trio.TooSlowError:
            raise Unavailable(
                f"Session store unavailable: no answer from Redis within {self._op_timeout:g}s", retry_after=2
            ) from None
        except BridgeClosed:
            raise Unavailable("Session store unavailable: shutting down", retry_after=2) from None
        except BridgeMissing:
            raise
        except Exception as exc:  # redis.RedisError, OSError, asyncio.TimeoutError ...
            if _is_redis_failure(exc):
                raise Unavailable(f"Session store unavailable: {_describe(exc)}", retry_after=2) from exc
            raise

    # --- SessionStore ----------------------------------------------------------------------------
    async def create_session(self, *, entity_id: str | None, user_id: str | None) -> Session:
        sid = new_id()
        now = utcnow()
        expires = now + dt.timedelta(seconds=self._ttl) if self._ttl else FOREVER
        metadata: dict[str, Any] = {}
        if entity_id:
            metadata["entity_id"] = entity_id
        if user_id:
            metadata["user_id"] = user_id
        mapping = {
            "session_id": sid,
            "status": "active",
            "created_at": _iso(now),
            "last_activity": _iso(now),
            "expires_at": _iso(expires),
            **_EMPTY_SESSION_FIELDS,
            "metadata": json.dumps(metadata),
        }

        async def op() -> None:
            pipe = self._pipeline()
            pipe.hset(self.session_key(sid), mapping=mapping)
            if self._ttl:
                pipe.expire(self.session_key(sid), self._ttl)
            pipe = await self._flush_record_first(pipe)
            pipe.sadd(self.index_key, sid)
            if entity_id:
                pipe.sadd(self.entity_key(entity_id), sid)
            await pipe.execute()

        await self._run(op)
        return Session(sid, "active", now, now, expires, metadata)

    async def get_session(self, session_id: str) -> Session | None:
        now = utcnow()
        flat = await self._run(lambda: self._touch_script(keys=[self.session_key(session_id)], args=[_iso(now)]))
        session = _session_from_hash(_pairs_to_dict(flat or []))
        if session is None or session.expires_at <= now:
            return None
        if session.status == "active":
            session.last_activity = now
        return session

    async def find_entity_session(self, entity_id: str) -> Session | None:
        key = self.entity_key(entity_id)

        async def op() -> list[str]:
            now = utcnow()
            live: list[tuple[dt.datetime, str]] = []
            dead: list[str] = []
            cursor, seen = 0, 0
            while True:
                cursor, members = await self._r.sscan(key, cursor, count=200)
                members = [m for m in members if m]
                if members:
                    pipe = self._r.pipeline(transaction=False)
                    for sid in members:
                        pipe.hmget(self.session_key(sid), "session_id", "status", "expires_at", "last_activity")
                    for sid, (hid, status, expires, last) in zip(members, await pipe.execute()):
                        if not hid:
                            dead.append(sid)
                        elif status == "active" and _parse_time(expires, FOREVER) > now:
                            live.append((_parse_time(last, now), sid))
                seen += len(members)
                if cursor == 0 or seen >= _ENTITY_SCAN_LIMIT:
                    break
            if dead:
                # Ids of sessions whose hash expired or was deleted: KubeCodeRun never removes them.
                await self._r.srem(key, *dead)
            return [sid for _, sid in sorted(live, reverse=True)]

        for sid in await self._run(op):
            session = await self.get_session(sid)  # refreshes last_activity, re-checks liveness
            if session is not None and session.active:
                return session
        return None

    async def add_file(self, record: FileRecord) -> None:
        mapping = {
            "file_id": record.file_id,
            "filename": record.filename,
            "content_type": record.content_type,
            "object_key": record.object_key,
            "session_id": record.session_id,
            "created_at": _iso(record.created_at),
            "size": str(record.size),
            "path": record.path,
            "type": record.kind,
        }
        if record.owner:  # our own field; KubeCodeRun reads the hash's known fields only
            mapping["user_id"] = record.owner
        fkey, skey = self.file_key(record.session_id, record.file_id), self.session_files_key(record.session_id)

        async def op() -> None:
            pipe = self._pipeline()
            pipe.hset(fkey, mapping=mapping)
            if self._ttl:
                pipe.expire(fkey, self._ttl)
            pipe = await self._flush_record_first(pipe)
            pipe.sadd(skey, record.file_id)
            if self._ttl:
                pipe.expire(skey, self._ttl)
            await pipe.execute()

        await self._run(op)

    async def get_file(self, session_id: str, file_id: str) -> FileRecord | None:
        data = await self._run(lambda: self._r.hgetall(self.file_key(session_id, file_id)))
        record = _file_from_hash(data or {})
        if record is None or record.session_id != session_id or record.file_id != file_id:
            return None
        return record

    async def list_files(self, session_id: str) -> list[FileRecord]:
        async def op() -> list[dict[str, str]]:
            fids = sorted(await self._r.smembers(self.session_files_key(session_id)))
            if not fids:
                return []
            pipe = self._r.pipeline(transaction=False)
            for fid in fids:
                pipe.hgetall(self.file_key(session_id, fid))
            return await pipe.execute()

        records = [r for r in map(_file_from_hash, await self._run(op)) if r and r.session_id == session_id]
        records.sort(key=lambda r: r.created_at)
        return records

    async def delete_file(self, session_id: str, file_id: str) -> FileRecord | None:
        async def op() -> dict[str, str]:
            pipe = self._pipeline()
            pipe.hgetall(self.file_key(session_id, file_id))
            pipe.delete(self.file_key(session_id, file_id))
            pipe.srem(self.session_files_key(session_id), file_id)
            return (await pipe.execute())[0]

        return _file_from_hash(await self._run(op) or {})

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
                    for sid, (hid, expires) in zip(members, await pipe.execute()):
                        if not hid or _parse_time(expires, FOREVER) < now:
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
        """In-use and idle connections of the standalone/sentinel pool (tests assert on this)."""
        pool = getattr(self._r, "connection_pool", None)
        if pool is None:
            return {}
        return {
            "in_use": len(getattr(pool, "_in_use_connections", ())),
            "idle": len(getattr(pool, "_available_connections", ())),
            "max": int(getattr(pool, "max_connections", 0)),
        }


def _is_redis_failure(exc: BaseException) -> bool:
    import asyncio

    from redis.exceptions import RedisError

    return isinstance(exc, (RedisError, OSError, asyncio.TimeoutError, TimeoutError))


def _describe(exc: BaseException) -> str:
    """A short, client-safe reason (no internal addresses); the full error goes to the log."""
    from redis import exceptions as rex

    _log_failure(exc)
    if isinstance(exc, rex.AuthenticationError):
        return "Redis rejected the credentials"
    if isinstance(exc, rex.BusyLoadingError):
        return "Redis is loading its data"
    if isinstance(exc, (rex.TimeoutError, TimeoutError)):
        return "Redis timed out"
    if isinstance(exc, (rex.ConnectionError, OSError)):
        return "cannot connect to Redis"
    if isinstance(exc, rex.ResponseError):
        code = (str(exc).split() or ["error"])[0]
        return f"Redis answered {code[:40]}"
    return type(exc).__name__


_failures = Throttle(10.0)


def _log_failure(exc: BaseException) -> None:
    """Log the underlying error, at most every 10 s: an outage fails every request."""
    if _failures.ready():
        log.warning("Redis operation failed: %s: %s", type(exc).__name__, exc)


def _build_client(rs: RedisSettings) -> tuple[Any, bool]:
    """Create the redis-py client for the configured mode. Runs inside the asyncio context."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RConnectionError
    from redis.exceptions import TimeoutError as RTimeoutError

    # Two quick retries smooth over a dropped idle connection; an outage surfaces in well under a
    # second instead of after redis-py's default jittered back-off.
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)
    common = {
        # RESP2, as KubeCodeRun's client speaks it: redis-py 8 defaults to RESP3 (HELLO 3), which
        # servers older than Redis 6 reject.
        "protocol": 2,
        "decode_responses": True,
        "socket_timeout": rs.redis_socket_timeout,
        "socket_connect_timeout": rs.redis_socket_connect_timeout,
        "retry": retry,
        "retry_on_error": [RConnectionError, RTimeoutError],
    }
    tls = rs.tls_kwargs()
    if rs.redis_mode == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = RedisSettings.parse_nodes(rs.redis_cluster_nodes, 6379) or [(rs.redis_host, rs.redis_port)]
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            password=rs.redis_password,
            max_connections=rs.redis_max_connections,
            ssl=bool(tls),
            **tls,
            **common,
        )
        return client, True
    if rs.redis_mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        class BlockingSentinelPool(SentinelConnectionPool, aredis.BlockingConnectionPool):
            """Sentinel-managed, and bounded like the standalone pool: callers wait (up to the
            pool timeout) for a free connection instead of failing at once."""

        hosts = RedisSettings.parse_nodes(rs.redis_sentinel_nodes, 26379) or [(rs.redis_host, 26379)]
        sentinel = Sentinel(
            hosts,
            sentinel_kwargs={
                "password": rs.redis_sentinel_password,
                "socket_timeout": rs.redis_socket_timeout,
                "socket_connect_timeout": rs.redis_socket_connect_timeout,
                **({"ssl": True, **tls} if tls else {}),
            },
        )
        client = sentinel.master_for(
            rs.redis_sentinel_master,
            connection_pool_class=BlockingSentinelPool,
            timeout=rs.kcr_redis_pool_timeout,
            password=rs.redis_password,
            db=rs.redis_sentinel_db,
            max_connections=rs.redis_max_connections,
            **({"ssl": True, **tls} if tls else {}),
            **common,
        )
        return client, False
    pool = aredis.BlockingConnectionPool.from_url(
        rs.url(),
        max_connections=rs.redis_max_connections,
        timeout=rs.kcr_redis_pool_timeout,
        **tls,
        **common,
    )
    return aredis.Redis(connection_pool=pool), False


@asynccontextmanager
async def open_redis_sessions(
    settings: Settings, redis_settings: RedisSettings | None = None
) -> AsyncIterator[RedisSessionStore]:
    """A ``RedisSessionStore`` for the lifetime of the block. Needs the bridge (``open_bridge``).

    Does not connect: a Redis that is down at start-up makes ``ping()`` (readiness) fail and requests
    answer 503 until it comes back; the pool reconnects by itself.
    """
    rs = redis_settings or RedisSettings()

    async def build() -> tuple[Any, bool]:
        return _build_client(rs)

    client, cluster = await run_aio(build)
    op_timeout = rs.kcr_redis_pool_timeout + rs.redis_socket_connect_timeout + rs.redis_socket_timeout
    store = RedisSessionStore(
        client,
        prefix=rs.redis_key_prefix,
        ttl_hours=settings.session_ttl_hours,
        cluster=cluster,
        op_timeout=op_timeout,
        max_connections=rs.redis_max_connections,
    )
    async def close() -> None:
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:  # a pool we created ourselves is ours to disconnect
            await pool.disconnect()

    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await run_aio(close)
            except Exception as exc:  # closing is best-effort
                log.debug("closing the Redis client failed: %s", exc)
