"""File bytes in MinIO/S3, in KubeCodeRun's bucket and object layout.

Object keys come from the core (``FileRecord.object_key``): ``sessions/{sid}/uploads/{fid}`` and
``sessions/{sid}/outputs/{fid}``, raw bytes, in ``MINIO_BUCKET`` (default ``kubecoderun-files``),
so KubeCodeRun and kcr-trio read each other's files.

Client: ``miniopy-async`` (aiohttp) through the bridge; its settings (credentials, TLS), builder
and error mapping are in :mod:`kcr_trio.backends.s3_client`.

Uploads (``put``) spool to an unlinked temporary file, then send ONE ``PUT`` with a known length.
An upload the edge already spooled comes as ``interfaces.Spooled`` and is sent from that file as it
is (no second spool).
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

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import trio

from kcr_trio.backends import s3_client
from kcr_trio.backends.s3_client import (
    MISSING_KEY_CODES,
    S3_ERRORS,
    KeepOpen,
    S3Settings,
    open_s3_client,
    release_response,
    remove_batch,
)
from kcr_trio.backends.s3_put import FilePut
from kcr_trio.config import Settings
from kcr_trio.core.errors import NotFound, TooLarge, Unavailable
from kcr_trio.core.interfaces import Body, Spooled

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3Settings stays importable from here (tests and helpers import it from the store module).
__all__ = ["CHUNK", "SINGLE_PUT_LIMIT", "S3FileStore", "S3Settings", "open_s3_files"]

CHUNK = 64 * 1024
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's limit for one PUT
# Read buffer of a spool being sent: the request signer hashes the body in 8 KiB reads, one
# system call each without a buffer (1,200 for 10 MB). 1 MiB measured no faster than 256 KiB, and
# costs more memory per concurrent upload.
SPOOL_BUFFER = 256 * 1024
_PARTIAL_DELETE_TIMEOUT = 4.0  # removing the object a failed or cancelled PUT may have left


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
        # Uploads go out on Trio sockets where it can (static keys, path-style endpoint).
        self._file_put = FilePut(s3) if FilePut.usable(s3) else None

    # --- plumbing --------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run one asyncio coroutine function against S3 with a deadline and error mapping."""
        return await S3_ERRORS.call(fn, timeout=self.op_timeout if timeout is None else timeout,
                                    translate=self._translate)

    def _translate(self, exc: Exception) -> Exception | None:
        if s3_client.error_code(exc) == "NoSuchBucket":
            self._bucket_ok = False  # re-checked (and re-created, when allowed) on the next use
        return s3_client.translate(exc, bucket=self.bucket)

    async def _ensure_bucket(self) -> None:
        if self._bucket_ok:
            return
        async with self._bucket_lock:
            if self._bucket_ok:
                return

            async def op() -> None:
                if await self._client.bucket_exists(self.bucket):
                    return
                if not self._create_bucket:
                    raise Unavailable(f"File store unavailable: bucket {self.bucket} does not exist")
                try:
                    await self._client.make_bucket(self.bucket)
                    log.info("created bucket %s", self.bucket)
                except Exception as exc:  # another replica (or KubeCodeRun) won the race
                    if s3_client.error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

            await self._call(op)
            self._bucket_ok = True

    # --- FileStore -------------------------------------------------------------------------------
    async def put(self, key: str, chunks: Body, *, content_type: str, max_bytes: int | None = None) -> int:
        if isinstance(chunks, Spooled):
            # The upload edge's spool file, complete and of known size: sent as it is, no second
            # copy (that copy was a third of a 10 MB upload's CPU).
            if max_bytes is not None and chunks.size > max_bytes:
                raise TooLarge(f"File exceeds maximum size of {_human(max_bytes)}")
            spool = await trio.to_thread.run_sync(_open_spooled, chunks)
            try:
                digest = chunks.sha256
                if digest is None and self._file_put is not None:
                    digest = await trio.to_thread.run_sync(_digest, spool)
                await self._send(key, spool, chunks.size, content_type, digest)
            finally:
                spool.close()  # a local file: nothing to wait for
            return chunks.size
        spool = await trio.to_thread.run_sync(
            lambda: tempfile.TemporaryFile(dir=self._spool_dir, buffering=SPOOL_BUFFER)  # noqa: SIM115 - closed below
        )
        try:
            size, digest = await _spool(spool, chunks, max_bytes)
            await self._send(key, spool, size, content_type, digest)
            return size
        finally:
            spool.close()  # an unlinked local file: closing frees its blocks, no await needed

    async def _send(self, key: str, spool: IO[bytes], size: int, content_type: str, digest: str | None) -> None:
        content_type = content_type or "application/octet-stream"
        await self._ensure_bucket()
        try:
            await self._upload(key, spool, size, content_type, digest)
        except Unavailable:
            if self._bucket_ok or not self._create_bucket:
                raise
            # The bucket vanished (a fresh S3/MinIO without its data): create it, try once more.
            await self._ensure_bucket()
            await self._upload(key, spool, size, content_type, digest)

    async def _put_file(self, key: str, spool: IO[bytes], size: int, content_type: str, digest: str,
                        timeout: float) -> None:
        """The file as one PUT on Trio sockets (``s3_put.FilePut``), with the same deadline and
        error mapping as a bridged call."""
        assert self._file_put is not None
        with S3_ERRORS.map_exceptions(self._translate), trio.move_on_after(timeout) as deadline:
            await self._file_put.put(self.bucket, key, spool.fileno(), size, digest, content_type)
        if deadline.cancelled_caught:
            raise S3_ERRORS.unavailable(f"no answer from S3 within {timeout:g}s")

    async def _upload(self, key: str, spool: IO[bytes], size: int, content_type: str, digest: str | None) -> None:
        body = KeepOpen(spool)  # the HTTP client closes a file body after sending it

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
            if digest is not None and self._file_put is not None and size <= SINGLE_PUT_LIMIT:
                await self._put_file(key, spool, size, content_type, digest, timeout)
            else:
                await self._call(op, timeout=timeout)
            done = True
        finally:
            if not done:
                # The PUT may have landed even though we never saw the answer: remove it so no
                # orphan stays behind (there is no metadata pointing at it yet).
                with trio.CancelScope(shield=True), trio.move_on_after(_PARTIAL_DELETE_TIMEOUT):
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
            await release_response(response)

    async def delete(self, key: str) -> None:
        async def op() -> None:
            try:
                await self._client.remove_object(self.bucket, key)
            except Exception as exc:
                # Nothing there (or no bucket at all): the object is gone, which is what we wanted.
                code = s3_client.error_code(exc)
                if code not in MISSING_KEY_CODES and code != "NoSuchBucket":
                    raise

        await self._call(op)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (for session cleanup); returns how many."""
        if not prefix or not prefix.endswith("/"):
            raise ValueError("delete_prefix needs a folder-like prefix ending in '/'")

        async def op() -> int:
            count, batch = 0, []
            async for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
                batch.append(obj.object_name)
                if len(batch) == 1000:
                    count += await remove_batch(self._client, self.bucket, batch)
                    batch = []
            if batch:
                count += await remove_batch(self._client, self.bucket, batch)
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
        """Connections held by callers (aiohttp's and the Trio PUT's) and idle (aiohttp's connector; the
        Trio PUT's as ``put_idle``); tests assert on this."""
        connector = getattr(self._session, "connector", None)
        if connector is None:
            return {}
        idle = sum(len(v) for v in getattr(connector, "_conns", {}).values())
        busy, put_idle = self._file_put.stats() if self._file_put is not None else (0, 0)
        return {"in_use": len(getattr(connector, "_acquired", ())) + busy, "idle": idle, "max": connector.limit,
                "put_idle": put_idle}


def _open_spooled(spooled: Spooled) -> IO[bytes]:
    """Open the caller's spool file; unavailable if it is gone or no longer the size it had (the
    object's length is signed into the PUT, so a changed file must not be sent)."""
    try:
        handle = open(spooled.path, "rb", buffering=SPOOL_BUFFER)  # noqa: SIM115 - closed by put()
    except OSError as exc:
        raise Unavailable(f"File store unavailable: cannot read the upload spool ({exc.strerror or exc})") from exc
    if os.fstat(handle.fileno()).st_size != spooled.size:
        handle.close()
        raise Unavailable("File store unavailable: the upload spool changed size")
    return handle


def _digest(spool: IO[bytes]) -> str:
    """SHA-256 of a spool that came without one (the signed PUT needs it)."""
    spool.seek(0)
    hasher = hashlib.sha256()
    while piece := spool.read(SPOOL_BUFFER):
        hasher.update(piece)
    return hasher.hexdigest()


async def _spool(spool: IO[bytes], chunks: AsyncIterable[bytes], max_bytes: int | None) -> tuple[int, str]:
    """Write ``chunks`` to ``spool``, hashing them on the way (in the same worker-thread call)."""
    hasher = hashlib.sha256()

    def write(chunk: bytes) -> None:
        spool.write(chunk)
        hasher.update(chunk)

    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"File exceeds maximum size of {_human(max_bytes)}")
        await trio.to_thread.run_sync(write, chunk)
    await trio.to_thread.run_sync(spool.flush)
    return size, hasher.hexdigest()


def _human(n: int) -> str:
    mb = n / (1024 * 1024)
    return f"{mb:g}MB" if mb >= 1 else f"{n} bytes"


@asynccontextmanager
async def open_s3_files(settings: Settings, s3_settings: S3Settings | None = None) -> AsyncIterator[S3FileStore]:
    """An ``S3FileStore`` for the lifetime of the block. Needs the bridge (``open_bridge``).

    Checks (and creates, when allowed) the bucket once, but does not fail when S3 is down: the
    server starts, ``ping()`` (readiness) fails and file operations answer 503 until S3 is back.
    Upload spools go to ``KCR_SPOOL_DIR``, default ``<KCR_DATA_DIR>/spool``.
    """
    s3 = s3_settings or S3Settings()
    # Spool on disk under the data directory by default, not in /tmp, which may be a tmpfs (RAM).
    spool_dir = Path(s3.kcr_spool_dir or Path(settings.kcr_data_dir) / "spool")
    await trio.to_thread.run_sync(lambda: spool_dir.mkdir(parents=True, exist_ok=True))
    async with open_s3_client(s3) as (client, session):
        store = S3FileStore(client, session, s3, spool_dir=spool_dir)
        with trio.move_on_after(s3.kcr_s3_connect_timeout):
            try:
                await store._ensure_bucket()
            except Unavailable as exc:
                log.warning("S3 not ready at start-up (will retry on use): %s", exc.message)
        try:
            yield store
        finally:
            if store._file_put is not None:
                await store._file_put.aclose()  # closes at once, no I/O to wait for
