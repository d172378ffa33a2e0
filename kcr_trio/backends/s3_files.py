"""File bytes in MinIO/S3, in KubeCodeRun's bucket and object layout.

Object keys come from the core (``FileRecord.object_key``): ``sessions/{sid}/uploads/{fid}`` and
``sessions/{sid}/outputs/{fid}``, raw bytes, in ``MINIO_BUCKET`` (default ``kubecoderun-files``),
so KubeCodeRun and kcr-trio read each other's files. Credentials: static keys (``MINIO_*`` or the
``AWS_*`` aliases) or IAM (``MINIO_USE_IAM``: web identity from ``AWS_WEB_IDENTITY_TOKEN_FILE`` +
``AWS_ROLE_ARN``, else the instance/container role), TLS with an optional CA bundle.

Client: ``miniopy-async`` (aiohttp) through :mod:`kcr_trio.backends.aio_bridge`, on our own aiohttp
session: a bounded connection pool, connect/read timeouts, and no hidden retries (miniopy's default
session retries 5xx five times with 5-minute timeouts, which would hide an outage for minutes).

Uploads (``put``) spool to an unlinked temporary file, then send ONE ``PUT`` with a known length.
Why a spool rather than streaming a multipart upload:

* ``max_bytes`` is enforced before S3 is touched: an over-size upload stores nothing at all.
* One ``PUT`` is atomic: the object appears complete or not at all. A multipart upload cancelled
  half-way leaves an invisible in-progress upload that needs an ``Abort`` call to free its parts.
* SigV4 over plain HTTP signs the payload's SHA-256, which needs the whole body before sending;
  multipart would need every part (at least 5 MiB) buffered in memory instead.
* Memory stays flat: the body is streamed from the file by aiohttp (objects over 5 GiB, possible
  only without ``max_bytes``, fall back to a sequential multipart upload of bounded parts).
The spool lives in ``KCR_SPOOL_DIR`` (default ``<KCR_DATA_DIR>/spool``: on disk, unlike a /tmp that
may be a tmpfs) and is deleted when closed, also on cancellation or a crash (it is unlinked from
the start).

Downloads (``open``) stream the response in 64 KiB reads, and ALWAYS close (or release, if fully
read) the response in a shielded ``finally`` with its own timeout: an abandoned aiohttp response
keeps its pooled connection, and ten of those exhaust the pool so the next request hangs.

Failures: unreachable or failing S3 raises ``errors.Unavailable("File store unavailable: ...")``;
a missing object raises ``errors.NotFound``. A ``put`` that fails or is cancelled after the
request started deletes the key again (shielded, bounded), so no orphan is left behind.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import trio
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.backends.aio_bridge import BridgeClosed, BridgeMissing, run_aio
from kcr_trio.config import Settings
from kcr_trio.core.errors import NotFound, TooLarge, Unavailable
from kcr_trio.core.throttle import Throttle

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 64 * 1024
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's limit for one PUT
_CLOSE_TIMEOUT = 2.0
_MISSING_KEY_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}


class S3Settings(BaseSettings):
    """KubeCodeRun's MinIO variables; read only when ``KCR_FILE_STORE=s3``."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore", populate_by_name=True
    )

    minio_endpoint: str = "localhost:9000"  # host[:port], no scheme
    minio_access_key: str | None = Field(None, validation_alias=AliasChoices("minio_access_key", "aws_access_key_id"))
    minio_secret_key: str | None = Field(
        None, validation_alias=AliasChoices("minio_secret_key", "aws_secret_access_key")
    )
    minio_secure: bool = False
    minio_bucket: str = "kubecoderun-files"
    minio_region: str = "us-east-1"
    minio_use_iam: bool = False
    aws_web_identity_token_file: str | None = None
    aws_role_arn: str | None = None
    minio_ca_certs: str | None = None
    # Ours.
    kcr_minio_create_bucket: bool = True  # create the bucket when missing (KubeCodeRun does)
    kcr_s3_max_connections: int = Field(20, ge=1)
    kcr_s3_connect_timeout: float = Field(5.0, gt=0)  # includes waiting for a pooled connection
    kcr_s3_read_timeout: float = Field(30.0, gt=0)  # longest silence on an open connection
    kcr_spool_dir: Path | None = None  # default: <KCR_DATA_DIR>/spool

    @field_validator("minio_endpoint", mode="before")
    @classmethod
    def _strip_scheme(cls, v: Any) -> Any:
        if isinstance(v, str):
            for scheme in ("http://", "https://"):
                if v.startswith(scheme):
                    v = v[len(scheme) :]
            return v.rstrip("/")
        return v

    @field_validator(
        "minio_access_key", "minio_secret_key", "aws_web_identity_token_file", "aws_role_arn", "minio_ca_certs",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v


class _Body:
    """Async iterator over an open aiohttp response; each read is one bridged call."""

    def __init__(self, store: S3FileStore, response: Any) -> None:
        self._store = store
        self._response = response

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk: bytes = await self._store._call(lambda: self._response.content.read(CHUNK), timeout=self._store.read_timeout)
        if not chunk:
            raise StopAsyncIteration
        return chunk


class S3FileStore:
    """``FileStore`` on S3/MinIO. Build it with :func:`open_s3_files`."""

    def __init__(self, client: Any, session: Any, s3: S3Settings, *, spool_dir: Path | None = None) -> None:
        self._client = client
        self._session = session
        self.bucket = s3.minio_bucket
        self._create_bucket = s3.kcr_minio_create_bucket
        self._spool_dir = str(spool_dir) if spool_dir else None
        self.read_timeout = s3.kcr_s3_read_timeout
        # Short operations (HEAD/DELETE/small GETs): connect + one read window.
        self.op_timeout = s3.kcr_s3_connect_timeout + s3.kcr_s3_read_timeout
        self._bucket_ok = False
        self._bucket_lock = trio.Lock()

    # --- plumbing --------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run one asyncio coroutine function against S3 with a deadline and error mapping."""
        limit = self.op_timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                return await run_aio(fn)
        except trio.TooSlowError:
            raise Unavailable(f"File store unavailable: no answer from S3 within {limit:g}s", retry_after=2) from None
        except BridgeClosed:
            raise Unavailable("File store unavailable: shutting down", retry_after=2) from None
        except BridgeMissing:
            raise
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: Exception) -> Exception:
        from miniopy_async.error import InvalidResponseError, S3Error, ServerError

        if isinstance(exc, S3Error):
            if exc.code in _MISSING_KEY_CODES:
                return NotFound("File not found in storage")
            if exc.code == "NoSuchBucket":
                self._bucket_ok = False
                return Unavailable(f"File store unavailable: bucket {self.bucket} does not exist", retry_after=2)
            _log_failure(exc)
            return Unavailable(f"File store unavailable: S3 answered {exc.code}", retry_after=2)
        if isinstance(exc, (ServerError, InvalidResponseError)):
            _log_failure(exc)
            status = getattr(exc, "_status_code", None) or getattr(exc, "_code", None)
            return Unavailable(f"File store unavailable: S3 answered HTTP {status or 'error'}", retry_after=2)
        if _is_transport_error(exc):
            _log_failure(exc)
            return Unavailable(f"File store unavailable: {_transport_reason(exc)}", retry_after=2)
        return exc

    async def _ensure_bucket(self) -> None:
        if self._bucket_ok:
            return
        async with self._bucket_lock:
            if self._bucket_ok:
                return

            async def op() -> None:
                from miniopy_async.error import S3Error

                if await self._client.bucket_exists(self.bucket):
                    return
                if not self._create_bucket:
                    raise Unavailable(f"File store unavailable: bucket {self.bucket} does not exist")
                try:
                    await self._client.make_bucket(self.bucket)
                    log.info("created bucket %s", self.bucket)
                except S3Error as exc:  # another replica (or KubeCodeRun) won the race
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

            await self._call(op)
            self._bucket_ok = True

    # --- FileStore -------------------------------------------------------------------------------
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str, max_bytes: int | None = None
    ) -> int:
        spool = await trio.to_thread.run_sync(lambda: tempfile.TemporaryFile(dir=self._spool_dir))  # noqa: SIM115 - closed below
        try:
            size = await _spool(spool, chunks, max_bytes)
            await self._ensure_bucket()
            try:
                await self._upload(key, spool, size, content_type or "application/octet-stream")
            except Unavailable:
                if self._bucket_ok or not self._create_bucket:
                    raise
                # The bucket vanished (a fresh S3/MinIO without its data): create it, try once more.
                await self._ensure_bucket()
                await self._upload(key, spool, size, content_type or "application/octet-stream")
            return size
        finally:
            spool.close()  # an unlinked local file: closing frees its blocks, no await needed

    async def _upload(self, key: str, spool: IO[bytes], size: int, content_type: str) -> None:
        body = _KeepOpen(spool)  # the HTTP client closes a file body after sending it

        async def op() -> None:
            spool.seek(0)
            if size <= SINGLE_PUT_LIMIT:
                await self._client.put_object(self.bucket, key, body, size, content_type=content_type, part_size=size)
            else:
                await self._client.put_object(
                    self.bucket, key, body, size, content_type=content_type, num_parallel_uploads=1
                )

        # Time to send the body is proportional to its size; aiohttp's connect/read timeouts bound
        # every stall, so the deadline here only guards against a server that trickles forever.
        timeout = self.op_timeout + size / (1024 * 1024)  # at least 1 MiB/s
        done = False
        try:
            await self._call(op, timeout=timeout)
            done = True
        finally:
            if not done:
                # The PUT may have landed even though we never saw the answer: remove it so no
                # orphan stays behind (there is no metadata pointing at it yet).
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT * 2):
                    try:
                        await self.delete(key)
                    except Exception as exc:  # best effort; the orphan sweep can take it later
                        log.warning("could not remove partial object %s: %s", key, exc)

    @asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[AsyncIterator[bytes]]:
        response = await self._call(lambda: self._client.get_object(self.bucket, key))
        try:
            yield _Body(self, response)
        finally:
            await _release(response)

    async def delete(self, key: str) -> None:
        async def op() -> None:
            from miniopy_async.error import S3Error

            try:
                await self._client.remove_object(self.bucket, key)
            except S3Error as exc:
                # Nothing there (or no bucket at all): the object is gone, which is what we wanted.
                if exc.code not in _MISSING_KEY_CODES and exc.code != "NoSuchBucket":
                    raise

        await self._call(op)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (for session cleanup); returns how many."""
        if not prefix or not prefix.endswith("/"):
            raise ValueError("delete_prefix needs a folder-like prefix ending in '/'")

        async def op() -> int:
            from miniopy_async.deleteobjects import DeleteObject

            count, batch = 0, []
            async for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
                batch.append(DeleteObject(obj.object_name))
                if len(batch) == 1000:
                    count += await _remove_batch(self._client, self.bucket, batch)
                    batch = []
            if batch:
                count += await _remove_batch(self._client, self.bucket, batch)
            return count

        try:
            return await self._call(op)
        except NotFound:
            return 0

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, last-modified epoch)`` under ``prefix`` after ``start_after``
        (key order), for the orphan sweeper."""

        async def op() -> list[tuple[str, float]]:
            out: list[tuple[str, float]] = []
            kwargs = {"start_after": start_after} if start_after else {}
            async for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True, **kwargs):
                if obj.last_modified is not None:
                    out.append((obj.object_name, obj.last_modified.timestamp()))
                if len(out) >= limit:
                    break
            return out

        try:
            return await self._call(op)
        except NotFound:
            return []

    async def ping(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._bucket_ok = False  # re-check: readiness must notice a bucket that went away
        await self._ensure_bucket()
        return {
            "backend": "s3",
            "bucket": self.bucket,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    def pool_stats(self) -> dict[str, int]:
        """Connections held by callers and idle in aiohttp's connector (tests assert on this)."""
        connector = getattr(self._session, "connector", None)
        if connector is None:
            return {}
        idle = sum(len(v) for v in getattr(connector, "_conns", {}).values())
        return {"in_use": len(getattr(connector, "_acquired", ())), "idle": idle, "max": connector.limit}


async def _spool(spool: IO[bytes], chunks: AsyncIterable[bytes], max_bytes: int | None) -> int:
    out = trio.wrap_file(spool)
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"File exceeds maximum size of {_human(max_bytes)}")
        await out.write(chunk)
    await out.flush()
    return size


async def _remove_batch(client: Any, bucket: str, batch: list[Any]) -> int:
    failed = [err async for err in client.remove_objects(bucket, batch)]
    if failed:
        raise RuntimeError(f"could not delete {len(failed)} objects: {failed[0]}")
    return len(batch)


async def _release(response: Any) -> None:
    """Give the connection back (fully read) or drop it (not fully read). Shielded and bounded:
    this runs on the way out of a cancelled download."""

    async def op() -> None:
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
        try:
            await run_aio(op)
        except Exception as exc:  # the connection is dropped either way
            log.debug("closing an S3 response failed: %s", exc)


def _is_transport_error(exc: BaseException) -> bool:
    import asyncio

    import aiohttp

    return isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError, TimeoutError))


def _transport_reason(exc: BaseException) -> str:
    """A short, client-safe reason (no internal addresses); the full error goes to the log."""
    import asyncio
    import ssl

    import aiohttp

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


_failures = Throttle(10.0)


def _log_failure(exc: BaseException) -> None:
    """Log the underlying error, at most every 10 s: an outage fails every request."""
    if _failures.ready():
        log.warning("S3 operation failed: %s: %s", type(exc).__name__, exc)


def _human(n: int) -> str:
    mb = n / (1024 * 1024)
    return f"{mb:g}MB" if mb >= 1 else f"{n} bytes"


def _build(s3: S3Settings) -> tuple[Any, Any]:
    """Create the aiohttp session and the Minio client. Runs inside the asyncio context."""
    import ssl

    import aiohttp
    from miniopy_async.api import Minio
    from miniopy_async.credentials.providers import IamAwsProvider

    ssl_ctx: ssl.SSLContext | bool = False
    if s3.minio_secure:
        if s3.minio_ca_certs:
            ssl_ctx = ssl.create_default_context(cafile=s3.minio_ca_certs)
        else:
            import certifi

            ssl_ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())
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
async def open_s3_files(settings: Settings, s3_settings: S3Settings | None = None) -> AsyncIterator[S3FileStore]:
    """An ``S3FileStore`` for the lifetime of the block. Needs the bridge (``open_bridge``).

    Checks (and creates, when allowed) the bucket once, but does not fail when S3 is down: the
    server starts, ``ping()`` (readiness) fails and file operations answer 503 until S3 is back.
    Upload spools go to ``KCR_SPOOL_DIR``, default ``<KCR_DATA_DIR>/spool``.
    """
    s3 = s3_settings or S3Settings()

    async def build() -> tuple[Any, Any]:
        return _build(s3)

    # Spool on disk under the data directory by default, not in /tmp, which may be a tmpfs (RAM).
    spool_dir = Path(s3.kcr_spool_dir or Path(settings.kcr_data_dir) / "spool")
    await trio.to_thread.run_sync(lambda: spool_dir.mkdir(parents=True, exist_ok=True))
    client, session = await run_aio(build)
    store = S3FileStore(client, session, s3, spool_dir=spool_dir)
    try:
        with trio.move_on_after(s3.kcr_s3_connect_timeout):
            try:
                await store._ensure_bucket()
            except Unavailable as exc:
                log.warning("S3 not ready at start-up (will retry on use): %s", exc.message)
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await run_aio(session.close)
            except Exception as exc:
                log.debug("closing the S3 session failed: %s", exc)


class _KeepOpen(io.RawIOBase):
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
