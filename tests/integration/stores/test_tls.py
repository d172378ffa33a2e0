"""TLS for both stores, against real TLS servers with a private CA: ``REDIS_SSL`` +
``REDIS_SSL_CA_CERTS`` and ``MINIO_SECURE`` + ``MINIO_CA_CERTS``. Without the CA the handshake must
fail with a clear ``Unavailable``, not succeed silently."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kcr_trio.backends.redis_sessions import open_redis_sessions
from kcr_trio.backends.s3_files import open_s3_files
from kcr_trio.config import Settings
from kcr_trio.core.errors import Unavailable
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3Server
from tests.support.tls import TlsFiles, make_tls_files


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tls=tls_files)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def tls_s3(tls_files: TlsFiles) -> Iterator[S3Server]:
    server = S3Server(tls=tls_files)
    try:
        server.start()
        yield server
    finally:
        server.close()


async def _one(data: bytes):
    yield data


async def test_redis_over_tls_with_a_private_ca(bridge, tls_redis: RedisServer, tls_files: TlsFiles) -> None:
    # REDIS_HOST/PORT + REDIS_SSL (no URL): the store must switch to TLS itself.
    rs = tls_redis.settings(
        "tls:", redis_url=None, redis_host="127.0.0.1", redis_port=tls_redis.port,
        redis_ssl=True, redis_ssl_ca_certs=str(tls_files.ca),
    )
    async with open_redis_sessions(Settings(), rs) as store:  # type: ignore[arg-type]
        s = await store.create_session(entity_id="e", user_id=None)
        got = await store.get_session(s.session_id)
        assert got is not None and got.session_id == s.session_id
        await store.ping()


async def test_redis_tls_rejects_an_unknown_ca(bridge, tls_redis: RedisServer) -> None:
    rs = tls_redis.settings("tls:", redis_socket_connect_timeout=2.0, kcr_redis_pool_timeout=2.0)  # rediss://, system CAs
    async with open_redis_sessions(Settings(), rs) as store:  # type: ignore[arg-type]
        with pytest.raises(Unavailable, match="Session store unavailable"):
            await store.ping()


async def test_s3_over_tls_with_a_private_ca(bridge, tls_s3: S3Server) -> None:
    async with open_s3_files(Settings(), tls_s3.settings("kcr-tls")) as blobs:  # type: ignore[arg-type]
        await blobs.put("sessions/t/uploads/f", _one(b"secret bytes"), content_type="text/plain")
        async with blobs.open("sessions/t/uploads/f") as body:
            assert b"".join([c async for c in body]) == b"secret bytes"
        await blobs.ping()
    assert tls_s3.list_keys("kcr-tls") == ["sessions/t/uploads/f"]


async def test_s3_tls_rejects_an_unknown_ca(bridge, tls_s3: S3Server) -> None:
    s3 = tls_s3.settings("kcr-tls-2", minio_ca_certs=None)
    async with open_s3_files(Settings(), s3) as blobs:  # type: ignore[arg-type]
        with pytest.raises(Unavailable, match="File store unavailable"):
            await blobs.ping()
