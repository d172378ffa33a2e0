"""A real S3 HTTP server for integration tests: moto in server mode, in its own process.

API (synchronous; use it from fixtures)::

    from tests.support.s3_server import S3Server, running_s3

    unique_bucket()                         # a fresh bucket name, to share one server safely
    with running_s3() as s3:                # starts on a free 127.0.0.1 port, waits until it answers
        s3.endpoint                         # "127.0.0.1:<port>" (MinIO style: no scheme)
        s3.url                              # "http://127.0.0.1:<port>"
        s3.env(bucket="b1")                 # {"MINIO_ENDPOINT": ..., "MINIO_ACCESS_KEY": ..., ...}
        s3.stop()                           # SIGTERM and wait: an outage (moto keeps state in memory,
        s3.start()                          #   so buckets and objects are gone after a restart)
        s3.list_keys("b1", prefix="sessions/")   # raw object keys, via boto3, for assertions
        s3.settings(bucket="b1")            # a kcr_trio S3Settings for open_s3_files()
    # leaving the block stops the server; nothing is left running

moto accepts any credentials; the fixed pair below is only there so that requests are signed like
real ones. Readiness is awaited by polling an HTTP request with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.process import ManagedServer
from tests.support.redis_server import free_port

ACCESS_KEY = "kcr-test-access"
SECRET_KEY = "kcr-test-secret-key"
REGION = "us-east-1"
START_TIMEOUT = 30.0  # moto imports a lot on start-up; on 2 busy cores it can take a few seconds


def unique_bucket() -> str:
    """A fresh, valid bucket name so tests sharing one server never see each other's objects."""
    import secrets

    return f"kcr-test-{secrets.token_hex(8)}"


class S3Server(ManagedServer):
    LOG_NAME = "moto.log"

    def __init__(self, port: int | None = None, tls: Any = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls = tls  # tests.support.tls.TlsFiles: serve HTTPS with that certificate
        self._dir = Path(tempfile.mkdtemp(prefix="kcr-moto-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, bucket: str = "kubecoderun-files") -> dict[str, str]:
        """Environment for ``S3Settings``/``Settings`` pointing at this server."""
        return {
            "MINIO_ENDPOINT": self.endpoint,
            "MINIO_ACCESS_KEY": ACCESS_KEY,
            "MINIO_SECRET_KEY": SECRET_KEY,
            "MINIO_SECURE": "true" if self.tls else "false",
            **({"MINIO_CA_CERTS": str(self.tls.ca)} if self.tls else {}),
            "MINIO_BUCKET": bucket,
            "MINIO_REGION": REGION,
            "KCR_FILE_STORE": "s3",
        }

    def settings(self, bucket: str = "kubecoderun-files", **overrides: object) -> object:
        """An ``S3Settings`` for this server (imported lazily: the helper works without kcr_trio)."""
        from kcr_trio.backends.s3_files import S3Settings

        values: dict[str, object] = {
            "minio_endpoint": self.endpoint,
            "minio_access_key": ACCESS_KEY,
            "minio_secret_key": SECRET_KEY,
            "minio_secure": bool(self.tls),
            "minio_ca_certs": str(self.tls.ca) if self.tls else None,
            "minio_bucket": bucket,
            "minio_region": REGION,
        }
        values.update(overrides)
        return S3Settings(**values)

    def start(self) -> None:
        if self.running:
            return
        log = open(self._dir / "moto.log", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port), *self._tls_args()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "AWS_DEFAULT_REGION": REGION},
        )
        log.close()
        self._wait_ready()

    def _tls_args(self) -> list[str]:
        return ["-c", str(self.tls.cert), "-k", str(self.tls.key)] if self.tls else []

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                ctx = self.tls.client_context() if self.tls else None
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2, context=ctx) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # it answered: good enough
            except OSError as exc:
                last = exc
            time.sleep(0.05)  # polling interval, bounded by the deadline above
        self.kill()
        raise RuntimeError(f"moto server did not answer within {START_TIMEOUT}s ({last})")

    def client(self) -> Any:
        """A boto3 client (independent of the code under test) for raw assertions and set-up."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            verify=str(self.tls.ca) if self.tls else None,
        )

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)


@contextlib.contextmanager
def running_s3(port: int | None = None) -> Iterator[S3Server]:
    server = S3Server(port)
    try:
        server.start()
        yield server
    finally:
        server.close()
