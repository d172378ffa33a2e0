"""The Redis client the session store runs on: settings, the builder, and error mapping.

Settings are KubeCodeRun's Redis variables (3.x names, so one ConfigMap/Secret serves both in
A/B) plus ours (``KCR_``). The builder creates redis-py's asyncio client for the configured mode
(standalone, sentinel, cluster) on a *bounded* pool — waiting for a free connection is bounded too —
with short retries, RESP2 and TLS as configured. It runs on the asyncio side of
:mod:`kcr_trio.backends.aio_bridge`, which is the only way in. Every failure to reach Redis becomes
``errors.Unavailable("Session store unavailable: <client-safe reason>")``; the full error is logged
(at most every 10 s).

Stores built on one client share it through a :class:`RedisHandle`: the client, the key prefix and
the one way to call it (deadline, cluster queueing, error mapping). The session store builds it; the
PTC store (``backends/ptc_store.py``) is given the session store's handle and needs nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse, urlunparse

import trio
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.backends.aio_bridge import StoreErrors, run_aio
from kcr_trio.backends.redis_resp import RespAuthError, RespError, RespPool, native_target

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["REDIS_ERRORS", "RedisHandle", "RedisSettings", "build_client", "open_native", "open_redis_client", "translate"]

REDIS_ERRORS = StoreErrors("Session store", "Redis", log)
_CLOSE_TIMEOUT = 5.0


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
    # Ours: the session store's hot reads on the Trio-native client (``backends/redis_resp.py``)
    # where it applies (standalone, plain TCP); false: everything on redis-py.
    kcr_redis_native: bool = True

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

    def operation_timeout(self) -> float:
        """The deadline of one store operation: a pooled connection, a connect, one reply."""
        return self.kcr_redis_pool_timeout + self.redis_socket_connect_timeout + self.redis_socket_timeout


def translate(exc: Exception) -> Exception | None:
    """A failure to reach Redis -> ``Unavailable`` with a client-safe reason; ``None`` otherwise."""
    import asyncio

    from redis.exceptions import RedisError

    if not isinstance(exc, (RedisError, RespError, OSError, asyncio.TimeoutError, TimeoutError)):
        return None
    return REDIS_ERRORS.unavailable(_describe(exc))


def _describe(exc: BaseException) -> str:
    """A short, client-safe reason (no internal addresses); the full error goes to the log."""
    from redis import exceptions as rex

    REDIS_ERRORS.log_failure(exc)
    if isinstance(exc, RespError):  # the native client's error replies, named as redis-py names them
        code = (str(exc).split() or ["error"])[0]
        if isinstance(exc, RespAuthError) or code in ("NOAUTH", "WRONGPASS"):
            return "Redis rejected the credentials"
        if code == "LOADING":
            return "Redis is loading its data"
        return f"Redis answered {code[:40]}"
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


@dataclass(frozen=True)
class RedisHandle:
    """One Redis client as the stores on it use it. Every store operation is one :meth:`run`, so
    they all get the same deadline, the same queueing in cluster mode and the same error mapping
    (``Session store unavailable: ...``, 503), whichever store issues it."""

    client: Any  # redis-py's asyncio client (standalone, sentinel or cluster)
    prefix: str  # REDIS_KEY_PREFIX: every key of every store starts with it
    cluster: bool
    op_timeout: float  # RedisSettings.operation_timeout()
    # redis-py's cluster client fails at once ("Too many connections") when a node's pool is
    # exhausted, where the standalone/sentinel pools wait. Cluster operations queue here instead
    # (one operation holds at most one connection per node), within the deadline.
    limiter: trio.CapacityLimiter | None = None

    # The Trio-native client for the session store's hot reads (standalone, plain TCP), or None.
    native: RespPool | None = None

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` against Redis on the asyncio side, within the operation deadline, with
        every failure mapped to ``Unavailable``."""
        return await REDIS_ERRORS.call(fn, timeout=self.op_timeout, translate=translate, limiter=self.limiter)

    async def run_native(self, fn: Callable[[RespPool], Awaitable[T]]) -> T:
        """``await fn(native)`` on the Trio-native client: the same deadline and error mapping."""
        native = self.native
        assert native is not None, "run_native without a native client"
        return await REDIS_ERRORS.call(lambda: fn(native), timeout=self.op_timeout, translate=translate, bridged=False)


@asynccontextmanager
async def open_native(rs: RedisSettings) -> AsyncIterator[RespPool | None]:
    """The Trio-native pool where it applies (``KCR_REDIS_NATIVE``, standalone, plain TCP), else None."""
    target = native_target(rs.url(), tls=bool(rs.tls_kwargs())) if (
        rs.kcr_redis_native and rs.redis_mode == "standalone") else None
    if target is None:
        yield None
        return
    pool = RespPool(target, max_connections=rs.redis_max_connections, pool_timeout=rs.kcr_redis_pool_timeout,
                    socket_timeout=rs.redis_socket_timeout, connect_timeout=rs.redis_socket_connect_timeout)
    try:
        yield pool
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await pool.aclose()


def build_client(rs: RedisSettings) -> tuple[Any, bool]:
    """Create the redis-py client for the configured mode. Runs inside the asyncio context."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RConnectionError
    from redis.exceptions import TimeoutError as RTimeoutError

    # Two quick retries smooth over a dropped idle connection; an outage surfaces in well under a
    # second instead of after redis-py's default jittered back-off.
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)
    common: dict[str, Any] = {
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
async def open_redis_client(rs: RedisSettings) -> AsyncIterator[tuple[Any, bool]]:
    """``(client, cluster)`` for the lifetime of the block. Needs the bridge (``open_bridge``).

    Does not connect: the pool connects on first use and reconnects by itself. Closing is
    shielded and bounded, and best-effort.
    """

    async def build() -> tuple[Any, bool]:
        return build_client(rs)

    client, cluster = await run_aio(build)

    async def close() -> None:
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:  # a pool we created ourselves is ours to disconnect
            await pool.disconnect()

    try:
        yield client, cluster
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await run_aio(close)
            except Exception as exc:  # closing is best-effort
                log.debug("closing the Redis client failed: %s", exc)
