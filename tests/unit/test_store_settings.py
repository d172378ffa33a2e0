"""Environment parsing of the Redis and S3 backend settings (KubeCodeRun's variable names)."""

from __future__ import annotations

import pytest

from kcr_trio.backends.redis_schema import file_from_hash, session_from_hash
from kcr_trio.backends.redis_sessions import RedisSettings
from kcr_trio.backends.s3_files import S3Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("REDIS_", "MINIO_", "AWS_", "KCR_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_redis_url_from_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis://cache.internal:6380")  # a URL pasted into REDIS_HOST
    monkeypatch.setenv("REDIS_PORT", "6390")
    monkeypatch.setenv("REDIS_PASSWORD", "pw")
    monkeypatch.setenv("REDIS_DB", "3")
    rs = RedisSettings()
    assert rs.url() == "redis://:pw@cache.internal:6390/3"
    assert rs.tls_kwargs() == {}


def test_redis_url_wins_and_ssl_switches_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://u:p@h:1/2")
    monkeypatch.setenv("REDIS_HOST", "ignored")
    monkeypatch.setenv("REDIS_SSL", "true")
    monkeypatch.setenv("REDIS_SSL_CA_CERTS", "/ca.pem")
    monkeypatch.setenv("REDIS_SSL_CERT_REQS", "none")
    rs = RedisSettings()
    assert rs.url() == "rediss://u:p@h:1/2"
    assert rs.tls_kwargs()["ssl_ca_certs"] == "/ca.pem"
    assert rs.tls_kwargs()["ssl_cert_reqs"] == "none"


def test_blank_values_from_helm_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "")
    monkeypatch.setenv("REDIS_URL", " ")
    rs = RedisSettings()
    assert rs.redis_password is None and rs.url() == "redis://localhost:6379/0"


def test_node_lists() -> None:
    assert RedisSettings.parse_nodes("a:7000, b:7001,c", 6379) == [("a", 7000), ("b", 7001), ("c", 6379)]
    assert RedisSettings.parse_nodes("", 26379) == []


def test_modes_and_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_MODE", "cluster")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "kcr:")
    rs = RedisSettings()
    assert (rs.redis_mode, rs.redis_key_prefix) == ("cluster", "kcr:")
    monkeypatch.setenv("REDIS_MODE", "bogus")
    with pytest.raises(ValueError):
        RedisSettings()


def test_s3_defaults_and_aws_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = S3Settings()
    assert (s3.minio_endpoint, s3.minio_bucket, s3.minio_region, s3.minio_secure) == (
        "localhost:9000", "kubecoderun-files", "us-east-1", False,
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("MINIO_ENDPOINT", "https://s3.example.com/")
    s3 = S3Settings()
    assert (s3.minio_access_key, s3.minio_secret_key, s3.minio_endpoint) == ("AKIA", "secret", "s3.example.com")
    monkeypatch.setenv("MINIO_ACCESS_KEY", "minio-wins")
    assert S3Settings().minio_access_key == "minio-wins"


def test_kcr_hashes_parse() -> None:
    s = session_from_hash({
        "session_id": "s1", "status": "active", "created_at": "2026-02-10T12:34:56.789012+00:00",
        "last_activity": "2026-02-10T12:35:00+00:00", "expires_at": "9999-12-31T23:59:59+00:00",
        "metadata": '{"entity_id": "e1"}', "memory_usage_mb": "",
    })
    assert s is not None and s.active and s.metadata == {"entity_id": "e1"}
    assert session_from_hash({"last_activity": "2026-02-10T12:35:00+00:00"}) is None
    f = file_from_hash({
        "file_id": "f1", "filename": "x.txt", "content_type": "text/plain",
        "object_key": "sessions/s1/outputs/f1", "session_id": "s1", "created_at": "2026-02-10T10:00:00+00:00",
        "size": "0", "path": "/outputs/x.txt",  # no "type": told by the object key
    })
    assert f is not None and f.kind == "output" and f.object_key == "sessions/s1/outputs/f1"
