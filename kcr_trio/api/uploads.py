"""Streaming ``multipart/form-data`` parsing for ``/upload``: request body → spool files on disk.

The body is fed chunk by chunk to python-multipart's streaming ``MultipartParser`` (:class:`_Parts`); file parts are written to
spool files as they arrive, so a 100 MB upload costs at most one spool batch of memory, and a part that passes the
size limit is refused (413) while it is still arriving, not after. Spooling (rather than streaming
straight to the store) lets us read every form field first — LibreChat sends ``entity_id`` before
the file, but other clients need not — and means a cancelled upload never leaves a partial object in
the store: the spool files are removed in ``finally``.

Spool writes are batched (:class:`_SpoolWriter`): the parser hands over one piece per received chunk
(64-128 KiB), and a worker-thread round trip per piece cost more CPU than the write itself (profiled:
parse and spool of 10 MB took 24 ms of CPU with werkzeug's decoder and one ``trio`` file write per
piece, 8-10 ms now). Pieces are collected up to ``SPOOL_FLUSH_BYTES`` and written with one ``writev`` in
a worker thread, so a 10 MB file takes about twenty hand-offs instead of ~160, and memory per upload
stays bounded by that batch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from werkzeug.http import parse_options_header

from kcr_trio.core.errors import ApiError, BadRequest, TooLarge

FILE_FIELDS = ("file", "files")
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 1000
MAX_PART_HEADER_BYTES = 16 * 1024
SPOOL_FLUSH_BYTES = 512 * 1024  # per upload in memory at most, before it is written to the spool file


class _SpoolWriter:
    """Buffered, thread-offloaded writes to one spool file (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        # The bytes' SHA-256, taken in the same worker-thread call as the write: the S3 PUT signs
        # it, and a second pass over the file cost a tenth of a 10 MB upload's CPU.
        self.hasher = hashlib.sha256()

    async def write(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= SPOOL_FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.pending or self.fd is None:
            return
        pieces, self.pending, self.pending_bytes = self.pending, [], 0
        await trio.to_thread.run_sync(_write_all, self.fd, pieces, self.hasher)

    async def aclose(self) -> None:
        """Write what is pending and close. On cancellation the file is closed anyway (the caller
        removes it): the final write is skipped, the descriptor never leaks."""
        try:
            await self.flush()
        finally:
            self.discard()

    def discard(self) -> None:
        self.pending, self.pending_bytes = [], 0
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _write_all(fd: int, pieces: list[bytes], hasher: Any) -> None:
    """``writev`` until every byte is written (a regular file may still write short); hash them."""
    views = [memoryview(p) for p in pieces if p]
    for view in views:
        hasher.update(view)
    while views:
        written = os.writev(fd, views[:1024])  # IOV_MAX is at least 1024 on Linux
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


@dataclass
class SpooledFile:
    filename: str
    content_type: str
    path: Path
    size: int = 0
    sha256: str | None = None  # set when the part is complete


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[SpooledFile] = field(default_factory=list)
    # Files refused by a per-file limit, with the reason (batch upload reports them per file).
    refused: list[tuple[str, str]] = field(default_factory=list)

    def cleanup(self) -> None:
        for item in self.files:
            try:
                os.unlink(item.path)
            except FileNotFoundError:
                pass


def boundary_of(content_type: str) -> bytes:
    mimetype, options = parse_options_header(content_type)
    if mimetype != "multipart/form-data":
        raise ApiError(f"Unsupported content type: {content_type or 'none'}", status=415)
    boundary = options.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise BadRequest("Malformed multipart body: missing boundary")
    return boundary.encode("latin-1")


async def parse_multipart(
    body: AsyncIterator[bytes],
    content_type: str,
    *,
    spool_dir: Path,
    max_file_bytes: int,
    max_files: int,
    refuse_oversize: bool = True,
) -> ParsedForm:
    """Parse the form. The caller must call ``form.cleanup()`` (in ``finally``) when done.

    ``refuse_oversize``: raise 413 for a file over the limit (``/upload``); otherwise skip it and
    note it in ``form.refused`` (``/upload/batch``).
    """
    parts = _Parts(boundary_of(content_type))
    form = ParsedForm()
    current_field: str | None = None
    field_bytes = bytearray()
    current_file: SpooledFile | None = None
    handle: _SpoolWriter | None = None
    skipping = False
    max_mb = max_file_bytes // (1024 * 1024)
    try:
        async for chunk in body:
            if not chunk:
                continue
            for kind, value in parts.feed(chunk):
                if kind == "part":
                    name, filename, part_type = value
                    if filename is not None and name in FILE_FIELDS:
                        if len(form.files) >= max_files:
                            raise TooLarge(f"Too many files: at most {max_files} per upload")
                        fd, path = tempfile.mkstemp(dir=spool_dir, suffix=".upload")
                        os.close(fd)
                        current_file = SpooledFile(filename=filename, path=Path(path),
                                                   content_type=part_type or "application/octet-stream")
                        form.files.append(current_file)
                        handle, skipping, current_field = _SpoolWriter(path), False, None
                    elif filename is not None:
                        current_field, current_file = None, None  # an unknown file field: ignore its data
                    else:
                        current_field, current_file = name, None
                        field_bytes.clear()
                elif kind == "data":
                    if current_file is not None and handle is not None and not skipping:
                        current_file.size += len(value)
                        if current_file.size > max_file_bytes:
                            message = f"File {current_file.filename} exceeds maximum size of {max_mb}MB"
                            if refuse_oversize:
                                raise TooLarge(message)
                            form.refused.append((current_file.filename, message))
                            handle.discard()
                            handle = None
                            form.files.remove(current_file)
                            os.unlink(current_file.path)
                            skipping = True
                        else:
                            await handle.write(value)
                    elif current_field is not None:
                        field_bytes.extend(value)
                        if len(field_bytes) > MAX_FIELD_BYTES:
                            raise BadRequest(f"Form field {current_field} is too large")
                elif kind == "end":
                    if handle is not None:
                        await handle.aclose()
                        if current_file is not None:
                            current_file.sha256 = handle.hasher.hexdigest()
                        handle = None
                    if current_field is not None:
                        try:
                            form.fields[current_field] = field_bytes.decode("utf-8")
                        except UnicodeDecodeError:
                            raise BadRequest(f"Form field {current_field} is not valid UTF-8") from None
                    current_field, current_file = None, None
        if not parts.finished:
            where = "inside a part" if parts.in_part else "before the closing boundary"
            raise BadRequest(f"Malformed multipart body: the body ended {where}")
        return form
    except BaseException:
        form.cleanup()
        raise
    finally:
        if handle is not None:
            handle.discard()  # an unfinished part: its spool file is removed by cleanup()


class _Parts:
    """python-multipart's streaming parser (the one Starlette uses) as a list of events per chunk.

    Its callbacks run synchronously inside ``write()``; they only record, so that the async side can
    write to the spool and check limits between chunks (a part over the limit is refused within one
    read of the socket). Part data is passed on without a copy where the parser hands out slices of
    our own (immutable) chunk, which is nearly always.
    """

    def __init__(self, boundary: bytes) -> None:
        self.events: list[tuple[str, Any]] = []
        self.finished = self.in_part = False
        self.parts = 0
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._header_bytes = 0
        self._delimiter = b"--" + boundary
        self._preamble: bytes | None = b""  # None once the first delimiter was seen
        self._preamble_bytes = 0
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data,
            "on_part_end": self._end, "on_end": self._finish,
        })

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        self.events = []
        if self._preamble is not None:  # RFC 2046 allows text before the first delimiter
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return self.events
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BadRequest(f"Malformed multipart body: {exc}") from None
        return self.events

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """Drop what precedes the first delimiter (python-multipart wants the body to start with
        it); bounded, so a client cannot make us scan forever."""
        data = self._preamble + chunk if self._preamble else chunk
        at = data.find(self._delimiter)
        if at < 0:
            self._preamble_bytes += len(chunk)
            if self._preamble_bytes > MAX_FIELD_BYTES:
                raise BadRequest("Malformed multipart body: no boundary found")
            self._preamble = data[-len(self._delimiter):]
            return b""
        self._preamble = None
        return data[at:] if at else data

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise TooLarge(f"Too many form parts: at most {MAX_PARTS}")
        self.in_part = True
        self._headers, self._header_bytes = {}, 0
        self._field.clear()
        self._value.clear()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequest("Malformed multipart body: part headers too large")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_done(self) -> None:
        try:
            disposition = self._headers.get("content-disposition", b"").decode("utf-8")
            part_type = self._headers.get("content-type", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Malformed multipart body: part headers are not UTF-8") from None
        _, options = parse_options_header(disposition)
        self.events.append(("part", (options.get("name", ""), options.get("filename"), part_type)))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if end > start:  # a slice of our chunk is kept as a view; the parser's own buffers are copied
            piece = memoryview(data)[start:end] if type(data) is bytes else bytes(data[start:end])
            self.events.append(("data", piece))

    def _end(self) -> None:
        self.in_part = False
        self.events.append(("end", None))

    def _finish(self) -> None:
        self.finished = True
