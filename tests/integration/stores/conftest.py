"""Fixtures for the store backends: real redis-server and moto S3 processes, bridged clients.

* ``redis_server`` / ``s3_server``: one process each per test session (``tests/support``).
* ``bridge``: the trio-asyncio loop, open for the test (pytest-trio shares the fixture's context
  with the test, so the test's own calls can use the bridge).
* ``redis_store`` / ``s3_store``: production backends isolated per test by a random key prefix and
  a fresh bucket.
* ``redis_cluster`` / ``redis_sentinel``: a 3-master cluster and a master + sentinel, started on
  first use (the conformance suite runs on them too).
* ``session_store`` / ``file_store``: parametrised over the in-process twin and the real backends
  (Redis standalone, cluster and sentinel; S3), for the conformance suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kcr_trio.backends.aio_bridge import open_bridge
from kcr_trio.backends.redis_sessions import RedisSessionStore, open_redis_sessions
from kcr_trio.backends.s3_files import S3FileStore, open_s3_files
from kcr_trio.config import Settings
from tests.support.redis_server import (
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    running_redis,
    running_redis_cluster,
    running_redis_sentinel,
    unique_prefix,
)
from tests.support.s3_server import S3Server, running_s3, unique_bucket


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with running_redis_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServers]:
    with running_redis_sentinel() as servers:
        yield servers


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
async def bridge() -> AsyncIterator[None]:
    async with open_bridge():
        yield


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every ``Settings()`` in these tests keeps its data (upload spools) in the test's tmp dir."""
    monkeypatch.setenv("KCR_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def store_settings() -> Settings:
    return Settings(session_ttl_hours=0, session_cleanup_interval_minutes=10)


@pytest.fixture
async def redis_store(bridge: None, redis_server: RedisServer, store_settings: Settings) -> AsyncIterator[RedisSessionStore]:
    async with open_redis_sessions(store_settings, redis_server.settings(unique_prefix())) as store:  # type: ignore[arg-type]
        yield store


@pytest.fixture
async def s3_store(bridge: None, s3_server: S3Server, store_settings: Settings) -> AsyncIterator[S3FileStore]:
    async with open_s3_files(store_settings, s3_server.settings(unique_bucket())) as store:  # type: ignore[arg-type]
        yield store


@pytest.fixture(params=["memory", "redis", "redis-bridged", "redis-cluster", "redis-sentinel"])
def session_store_target(request: Any) -> Any:
    """What ``session_store`` runs on; servers are started only when a test needs them.
    ``redis`` reads through the Trio-native client (``backends/redis_resp.py``), ``redis-bridged``
    is the same server with everything on redis-py (``KCR_REDIS_NATIVE=false``)."""
    if request.param == "memory":
        return None
    if request.param == "redis-bridged":
        return request.getfixturevalue("redis_server").settings(unique_prefix(), kcr_redis_native=False)
    server = request.getfixturevalue(
        {"redis": "redis_server", "redis-cluster": "redis_cluster", "redis-sentinel": "redis_sentinel"}[request.param]
    )
    return server.settings(unique_prefix())


@pytest.fixture
async def session_store(session_store_target: Any, bridge: None, store_settings: Settings) -> AsyncIterator[Any]:
    if session_store_target is None:
        from kcr_trio.backends.memory_sessions import MemorySessionStore

        yield MemorySessionStore(ttl_hours=0)
        return
    async with open_redis_sessions(store_settings, session_store_target) as store:
        yield store


@pytest.fixture(params=["local", "s3"])
async def file_store(
    request: Any, bridge: None, s3_server: S3Server, store_settings: Settings, tmp_path: Path
) -> AsyncIterator[Any]:
    if request.param == "local":
        from kcr_trio.backends.local_files import LocalFileStore

        yield LocalFileStore(tmp_path / "files")
        return
    async with open_s3_files(store_settings, s3_server.settings(unique_bucket())) as store:  # type: ignore[arg-type]
        yield store
