"""The S3/MinIO client the file store runs on: the builder and error mapping. With
:mod:`kcr_trio.backends.s3_put` (uploads of a spooled file) the only modules that speak the S3 wire.

Settings are KubeCodeRun's MinIO variables (:mod:`kcr_trio.backends.s3_settings`, re-exported).
Credentials: static keys or IAM (``MINIO_USE_IAM``: web identity from
``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, else the instance/container role), TLS with an
optional CA bundle.

The builder puts ``miniopy-async`` on our own aiohttp session: a bounded connection pool,
connect/read timeouts, and no hidden retries (miniopy's default session retries 5xx five times with
5-minute timeouts, which would hide an outage for minutes). It runs on the asyncio side of
:mod:`kcr_trio.backends.aio_bridge`, which is the only way in. Uploads of a complete local file are
the exception: :mod:`kcr_trio.backends.s3_put` signs and sends them on Trio sockets (see there why).

Failures: unreachable or failing S3 becomes ``errors.Unavailable("File store unavailable: <client-safe
reason>")`` (the full error is logged at most every 10 s); a missing object ``errors.NotFound``.
"""

from __future__ import annotations

import io
import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Any

import h11
import trio

from kcr_trio.backends.aio_bridge import StoreErrors, run_aio
from kcr_trio.backends.s3_settings import S3Settings
from kcr_trio.core.errors import NotFound

log = logging.getLogger(__name__)

__all__ = [
    "MISSING_KEY_CODES", "S3_ERRORS", "KeepOpen", "S3Refused", "S3Settings", "build_client", "error_code", "open_s3_client",
    "release_response", "remove_batch", "translate",
]

S3_ERRORS = StoreErrors("File store", "S3", log)
MISSING_KEY_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
RELEASE_TIMEOUT = 2.0  # closing one response on the way out of a (cancelled) download
_CLOSE_TIMEOUT = 5.0


class S3Refused(Exception):
    """S3 answered with an error status: the HTTP status and S3's error ``Code`` (if it sent one)."""

    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(f"S3 answered HTTP {status}" + (f" ({code})" if code else ""))
        self.status = status
        self.code = code


def error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchKey``, ``NoSuchBucket``...) of an error S3 answered, else ``None``."""
    from miniopy_async.error import S3Error

    return exc.code if isinstance(exc, (S3Error, S3Refused)) else None


def translate(exc: Exception, *, bucket: str) -> Exception | None:
    """An S3 or transport failure -> ``NotFound`` / ``Unavailable``; ``None`` for anything else."""
    from miniopy_async.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Refused) and exc.code is None:
        S3_ERRORS.log_failure(exc)
        return S3_ERRORS.unavailable(f"S3 answered HTTP {exc.status}")
    if isinstance(exc, (S3Error, S3Refused)):
        code = exc.code
        if code in MISSING_KEY_CODES:
            return NotFound("File not found in storage")
        if code == "NoSuchBucket":
            return S3_ERRORS.unavailable(f"bucket {bucket} does not exist")
        S3_ERRORS.log_failure(exc)
        return S3_ERRORS.unavailable(f"S3 answered {code}")
    if isinstance(exc, (ServerError, InvalidResponseError)):
        S3_ERRORS.log_failure(exc)
        status = getattr(exc, "_status_code", None) or getattr(exc, "_code", None)
        return S3_ERRORS.unavailable(f"S3 answered HTTP {status or 'error'}")
    if _is_transport_error(exc):
        S3_ERRORS.log_failure(exc)
        return S3_ERRORS.unavailable(_transport_reason(exc))
    return None


def _is_transport_error(exc: BaseException) -> bool:
    import asyncio

    import aiohttp

    return isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError, TimeoutError, trio.TooSlowError,
                            trio.BrokenResourceError, h11.ProtocolError))


def _transport_reason(exc: BaseException) -> str:
    """A short, client-safe reason (no internal addresses); the full error goes to the log."""
    import asyncio

    import aiohttp

    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        return "TLS handshake with S3 failed"  # trio's SSLStream wraps the handshake's error
    if isinstance(exc, (trio.BrokenResourceError, h11.ProtocolError)):
        return "S3 closed the connection"
    if isinstance(exc, trio.TooSlowError):
        return "S3 timed out"
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return "TLS handshake with S3 failed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection to S3 broke during the transfer"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return "S3 timed out"
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionError)):
        return "cannot connect to S3"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "S3 closed the connection"
    return "cannot reach S3"


def ssl_context(s3: S3Settings) -> ssl.SSLContext | None:
    """The TLS context for ``MINIO_SECURE`` (``MINIO_CA_CERTS``, else ``SSL_CERT_FILE`` or certifi)."""
    if not s3.minio_secure:
        return None
    if s3.minio_ca_certs:
        return ssl.create_default_context(cafile=s3.minio_ca_certs)
    import certifi

    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


def build_client(s3: S3Settings) -> tuple[Any, Any]:
    """Create the aiohttp session and the Minio client. Runs inside the asyncio context."""
    import aiohttp
    from miniopy_async.api import Minio
    from miniopy_async.credentials.providers import IamAwsProvider

    ssl_ctx: ssl.SSLContext | bool = ssl_context(s3) or False
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=s3.kcr_s3_max_connections, ssl=ssl_ctx),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=s3.kcr_s3_connect_timeout,
            sock_connect=s3.kcr_s3_connect_timeout,
            sock_read=s3.kcr_s3_read_timeout,
        ),
        auto_decompress=False,
    )
    credentials = None
    access_key, secret_key = s3.minio_access_key, s3.minio_secret_key
    if s3.minio_use_iam:
        access_key = secret_key = None
        credentials = IamAwsProvider(
            token_file=s3.aws_web_identity_token_file, role_arn=s3.aws_role_arn, region=s3.minio_region
        )
    elif not (access_key and secret_key):
        raise ValueError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required unless MINIO_USE_IAM=true")
    client = Minio(
        s3.minio_endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=s3.minio_secure,
        region=s3.minio_region,
        session=session,
        credentials=credentials,
    )
    return client, session


@asynccontextmanager
async def open_s3_client(s3: S3Settings) -> AsyncIterator[tuple[Any, Any]]:
    """``(client, aiohttp session)`` for the lifetime of the block. Needs the bridge
    (``open_bridge``). Does not connect; closing the session is shielded, bounded, best-effort."""

    async def build() -> tuple[Any, Any]:
        return build_client(s3)

    client, session = await run_aio(build)
    try:
        yield client, session
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await run_aio(session.close)
            except Exception as exc:
                log.debug("closing the S3 session failed: %s", exc)


async def remove_batch(client: Any, bucket: str, names: list[str]) -> int:
    """Delete ``names`` with one multi-object DELETE (at most 1000); how many went."""
    from miniopy_async.deleteobjects import DeleteObject

    failed = [err async for err in client.remove_objects(bucket, [DeleteObject(n) for n in names])]
    if failed:
        raise RuntimeError(f"could not delete {len(failed)} objects: {failed[0]}")
    return len(names)


async def release_response(response: Any) -> None:
    """Give the connection back (fully read) or drop it (not fully read). Shielded and bounded:
    this runs on the way out of a cancelled download, and an abandoned aiohttp response keeps its
    pooled connection (ten of those exhaust the pool so the next request hangs)."""

    async def op() -> None:
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await run_aio(op)
        except Exception as exc:  # the connection is dropped either way
            log.debug("closing an S3 response failed: %s", exc)


class KeepOpen(io.RawIOBase):
    """The spool as an upload body that survives the HTTP client's ``close()`` after a send.

    ``put`` retries once when the bucket vanished (a fresh S3/MinIO without its data); the first
    attempt's client closed the unlinked spool file, so the retry met "seek of closed file" and
    the upload answered 500. Closing the spool stays ``put``'s job.
    """

    def __init__(self, spool: IO[bytes]) -> None:
        super().__init__()
        self._spool = spool

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Straight from the spool: the signer's SHA-256 pass reads 8 KiB at a time, and going
        through ``readinto`` added a copy per read (a sixth of a 10 MB upload's store CPU)."""
        return self._spool.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self._spool.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._spool.seek(offset, whence)

    def tell(self) -> int:
        return self._spool.tell()

    def fileno(self) -> int:
        return self._spool.fileno()

    def close(self) -> None:
        """Left open on purpose (see the class docstring)."""
