"""The S3/MinIO client the file store runs on: the builder, the upload PUT, and error mapping; the
one module that speaks the S3 wire.

Settings are KubeCodeRun's MinIO variables (:mod:`kcr_trio.backends.s3_settings`, re-exported).
Credentials: static keys or IAM (``MINIO_USE_IAM``: web identity from
``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, else the instance/container role), TLS with an
optional CA bundle.

The builder puts ``miniopy-async`` on our own aiohttp session: a bounded connection pool,
connect/read timeouts, and no hidden retries (miniopy's default session retries 5xx five times with
5-minute timeouts, which would hide an outage for minutes). It runs on the asyncio side of
:mod:`kcr_trio.backends.aio_bridge`, which is the only way in. Uploads of a complete local file are
the exception: :class:`FilePut` signs and sends them on Trio sockets (see there why).

Failures: unreachable or failing S3 becomes ``errors.Unavailable("File store unavailable: <client-safe
reason>")`` (the full error is logged at most every 10 s); a missing object ``errors.NotFound``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import IO, Any, cast
from urllib.parse import quote

import h11
import trio

from kcr_trio.backends.aio_bridge import StoreErrors, run_aio
from kcr_trio.backends.s3_settings import S3Settings
from kcr_trio.core.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

__all__ = [
    "MISSING_KEY_CODES", "S3_ERRORS", "FilePut", "KeepOpen", "S3Refused", "S3Settings", "build_client", "error_code", "open_s3_client",
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


# --- One PUT of a complete local file, on Trio sockets ----------------------------------------------
# Why not miniopy-async for this request: sending a 10 MB spool through it cost ~20 ms of CPU
# (measured): a second SHA-256 pass in 8 KiB reads, aiohttp's 256 KiB file reads each handed to a
# worker thread through the asyncio bridge, and the bridge hops themselves. Here the payload digest
# comes with the file (computed while the upload edge wrote its spool) and the body goes to the
# socket with ``os.sendfile`` (no copy through Python), over TLS in 1 MiB reads.

TLS_PIECE = 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


class _Stale(Exception):
    """The connection ended before any byte of an answer (a kept-alive one the server had closed)."""


class _FileSpan:
    """``size`` bytes of a file as an h11 body piece: h11 only needs the length (its sendfile support)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign_v4(method: str, host: str, path: str, headers: dict[str, str], payload_sha256: str, *, access_key: str,
            secret_key: str, region: str, now: datetime) -> dict[str, str]:
    """``headers`` plus ``host``, ``x-amz-date``, ``x-amz-content-sha256`` and ``authorization``:
    AWS Signature Version 4 for service ``s3``, no query string, every header signed. ``path`` is
    sent as given (already URI-encoded; S3 does not encode it twice)."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    signed = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    names = sorted(signed)
    canonical = "\n".join([method, path, "", *(f"{n}:{signed[n]}" for n in names), "", ";".join(names), payload_sha256])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + secret_key).encode(), day)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return signed


class FilePut:
    """``PUT`` a complete local file with a known SHA-256 as one object, over Trio sockets, keeping
    idle connections for the next upload. At most ``KCR_S3_MAX_CONNECTIONS`` at once (waiting for
    one counts as connecting, as in aiohttp); a kept connection the server closed meanwhile is
    replaced once (a PUT is idempotent). Any failure or cancellation drops the connection at once.

    Only for static keys on a path-style endpoint (``usable``): IAM credentials rotate through
    miniopy's provider, and AWS itself wants virtual-host addressing; those keep miniopy.
    """

    def __init__(self, s3: S3Settings) -> None:
        host, _, port = s3.minio_endpoint.rpartition(":")
        if not host or not port.isdigit():
            host, port = s3.minio_endpoint, "443" if s3.minio_secure else "80"
        self._host, self._port = host.strip("[]"), int(port)
        self._host_header = s3.minio_endpoint
        self._ssl = ssl_context(s3)
        self._keys = (s3.minio_access_key or "", s3.minio_secret_key or "")
        self._region = s3.minio_region
        self._connect_timeout = s3.kcr_s3_connect_timeout
        self._read_timeout = s3.kcr_s3_read_timeout
        self._max = s3.kcr_s3_max_connections
        self._slots = trio.Semaphore(self._max)
        self._idle: list[trio.abc.Stream] = []

    @staticmethod
    def usable(s3: S3Settings) -> bool:
        host = s3.minio_endpoint.lower()
        return bool(not s3.minio_use_iam and s3.minio_access_key and s3.minio_secret_key
                    and "amazonaws.com" not in host and "aliyuncs.com" not in host)  # virtual-host style

    async def put(self, bucket: str, key: str, fd: int, size: int, sha256: str, content_type: str) -> None:
        path = f"/{quote(bucket)}/{quote(key)}"
        if not (content_type.isascii() and content_type.isprintable()):
            content_type = "application/octet-stream"  # a header value must be plain ASCII
        headers = sign_v4("PUT", self._host_header, path, {"content-length": str(size), "content-type": content_type},
                          sha256, access_key=self._keys[0], secret_key=self._keys[1], region=self._region,
                          now=datetime.now(UTC))
        request = h11.Request(method="PUT", target=path, headers=list(headers.items()))
        with trio.fail_after(self._connect_timeout):
            await self._slots.acquire()
        try:
            for fresh in (False, True):
                stream, reused = await self._checkout(fresh)
                try:
                    keep = await self._exchange(stream, request, fd, size)
                except _Stale:  # only a kept connection is tried again (a PUT is idempotent)
                    await trio.aclose_forcefully(stream)
                    if reused:
                        await self.aclose()  # the server closed its idle connections: drop the others too
                        continue
                    raise trio.BrokenResourceError("S3 closed the connection without an answer") from None
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                if keep:
                    self._idle.append(stream)
                else:
                    await trio.aclose_forcefully(stream)
                return
        finally:
            self._slots.release()

    def stats(self) -> tuple[int, int]:
        """(connections busy with a PUT, kept idle)."""
        return self._max - self._slots.value, len(self._idle)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for stream in idle:
            await trio.aclose_forcefully(stream)

    async def _checkout(self, fresh: bool) -> tuple[trio.abc.Stream, bool]:
        if self._idle and not fresh:
            return self._idle.pop(), True
        with trio.fail_after(self._connect_timeout):
            tcp = await trio.open_tcp_stream(self._host, self._port)
            if self._ssl is None:
                return tcp, False
            tls = trio.SSLStream(tcp, self._ssl, server_hostname=self._host, https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            return tls, False

    async def _exchange(self, stream: trio.abc.Stream, request: h11.Request, fd: int, size: int) -> bool:
        """Send the request and the file, read the answer; True if the connection can be kept."""
        conn = h11.Connection(h11.CLIENT)
        head = conn.send(request)
        conn.send_with_data_passthrough(h11.Data(data=cast(bytes, _FileSpan(size))))
        conn.send(h11.EndOfMessage())
        failure: BaseException | None = None
        try:
            with trio.fail_after(self._read_timeout):
                await stream.send_all(head or b"")
            await self._send_file(stream, fd, size)
        except (trio.BrokenResourceError, OSError) as exc:
            failure = exc  # S3 may have refused early (and closed): its answer says why
        try:
            status, code = await self._answer(conn, stream)
        except _Stale as stale:
            raise stale from failure  # no answer at all: the sending failure (if any) is why
        if not 200 <= status < 300:
            raise S3Refused(status, code)
        if failure is not None:
            raise failure
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _send_file(self, stream: trio.abc.Stream, fd: int, size: int) -> None:
        offset = 0
        while offset < size:
            await trio.lowlevel.checkpoint()
            if isinstance(stream, trio.SocketStream):
                try:
                    sent = os.sendfile(stream.socket.fileno(), fd, offset, size - offset)
                except BlockingIOError:
                    with trio.fail_after(self._read_timeout):
                        await trio.lowlevel.wait_writable(stream.socket)
                    continue
            else:
                data = await trio.to_thread.run_sync(os.pread, fd, min(TLS_PIECE, size - offset), offset)
                with trio.fail_after(self._read_timeout):
                    await stream.send_all(data)
                sent = len(data)
            if not sent:
                raise Unavailable("File store unavailable: the upload spool ended early")
            offset += sent

    async def _answer(self, conn: h11.Connection, stream: trio.abc.Stream) -> tuple[int, str | None]:
        status, body, received = 0, bytearray(), False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    with trio.fail_after(self._read_timeout):
                        data = await stream.receive_some(64 * 1024)
                except (trio.BrokenResourceError, OSError) as exc:
                    if received:
                        raise
                    raise _Stale from exc
                if not data and not received:
                    raise _Stale
                received = True
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if len(body) < MAX_ERROR_BODY:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("S3 closed the connection")
        found = None if 200 <= status < 300 else _CODE.search(body)
        return status, found.group(1).decode("ascii", "replace") if found else None
