"""One PUT of a complete local file to S3/MinIO, on Trio sockets: the upload path's S3 wire.

Why not miniopy-async for this request: sending a 10 MB spool through it cost ~20 ms of CPU
(measured): a second SHA-256 pass in 8 KiB reads, aiohttp's 256 KiB file reads each handed to a
worker thread through the asyncio bridge, and the bridge hops themselves. Here the payload digest
comes with the file (computed while the upload edge wrote its spool) and the body goes to the
socket with ``os.sendfile`` (no copy through Python), over TLS in 1 MiB reads.

Everything else S3 (listing, reads, deletes, IAM credentials, virtual-host endpoints) stays on
:mod:`kcr_trio.backends.s3_client`, whose TLS context and refusal type this module shares.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from datetime import UTC, datetime
from typing import cast
from urllib.parse import quote

import h11
import trio

from kcr_trio.backends.s3_client import S3Refused, ssl_context
from kcr_trio.backends.s3_settings import S3Settings
from kcr_trio.core.errors import Unavailable

log = logging.getLogger(__name__)

__all__ = ["FilePut", "sign_v4"]


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
