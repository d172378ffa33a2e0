"""Fixtures for the store backends: real redis-server and moto S3 processes, bridged clients.

* ``redis_server`` / ``s3_server``: one process each per test session (``tests/support``).
* ``bridge``: the trio-asyncio loop, open for the test (pytest-trio shares the fixture's context
  with the test, so the test's own calls can use the bridge).
* ``redis_store`` / ``s3_store``: production backends isolated per test by a random key prefix and
  a fresh bucket.
* ``session_store`` / ``file_store``: parametrised over the in-process twin and the real backend,
  for the conformance suite.
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
from kcr_trio.core.ids import new_id
from tests.support.redis_server import RedisServer, running_redis
from tests.support.s3_server import S3Server, running_s3


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
async def bridge() -> AsyncIterator[None]:
    async with open_bridge():
        yield


def unique_prefix() -> str:
    return f"t{new_id()}:"


def unique_bucket() -> str:
    return f"kcr-test-{new_id().lower().replace('_', '-')}"[:40].rstrip("-")


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


@pytest.fixture(params=["memory", "redis"])
async def session_store(
    request: Any, bridge: None, redis_server: RedisServer, store_settings: Settings
) -> AsyncIterator[Any]:
    if request.param == "memory":
        from kcr_trio.backends.memory_sessions import MemorySessionStore

        yield MemorySessionStore(ttl_hours=0)
        return
    async with open_redis_sessions(store_settings, redis_server.settings(unique_prefix())) as store:  # type: ignore[arg-type]
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
