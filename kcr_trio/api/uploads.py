"""Streaming ``multipart/form-data`` parsing for ``/upload``: request body → spool files on disk.

The body is fed chunk by chunk to werkzeug's sans-I/O ``MultipartDecoder``; file parts are written to
spool files as they arrive, so a 100 MB upload costs one chunk of memory, and a part that passes the
size limit is refused (413) while it is still arriving, not after. Spooling (rather than streaming
straight to the store) lets us read every form field first — LibreChat sends ``entity_id`` before
the file, but other clients need not — and means a cancelled upload never leaves a partial object in
the store: the spool files are removed in ``finally``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import trio
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from kcr_trio.core.errors import ApiError, BadRequest, TooLarge

FILE_FIELDS = ("file", "files")
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 1000


@dataclass
class SpooledFile:
    filename: str
    content_type: str
    path: Path
    size: int = 0


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
    decoder = MultipartDecoder(boundary_of(content_type), max_form_memory_size=None, max_parts=MAX_PARTS)
    form = ParsedForm()
    current_field: str | None = None
    field_bytes = bytearray()
    current_file: SpooledFile | None = None
    handle = None
    skipping = False
    max_mb = max_file_bytes // (1024 * 1024)
    try:
        async for chunk in _with_end(body):
            decoder.receive_data(chunk)
            while True:
                try:
                    event = decoder.next_event()
                except ValueError as exc:
                    raise BadRequest(f"Malformed multipart body: {exc}") from None
                if isinstance(event, NeedData):
                    break
                if isinstance(event, File) and event.name in FILE_FIELDS:
                    if len(form.files) >= max_files:
                        raise TooLarge(f"Too many files: at most {max_files} per upload")
                    fd, name = tempfile.mkstemp(dir=spool_dir, suffix=".upload")
                    os.close(fd)
                    current_file = SpooledFile(
                        filename=event.filename or "",
                        content_type=event.headers.get("content-type", "application/octet-stream")
                        or "application/octet-stream",
                        path=Path(name),
                    )
                    form.files.append(current_file)
                    handle = await trio.open_file(name, "wb")
                    skipping = False
                elif isinstance(event, File):
                    current_field, current_file = None, None  # an unknown file field: ignore its data
                elif isinstance(event, Field):
                    current_field, current_file = event.name, None
                    field_bytes.clear()
                elif isinstance(event, Data):
                    if current_file is not None and handle is not None and not skipping:
                        current_file.size += len(event.data)
                        if current_file.size > max_file_bytes:
                            message = f"File {current_file.filename} exceeds maximum size of {max_mb}MB"
                            if refuse_oversize:
                                raise TooLarge(message)
                            form.refused.append((current_file.filename, message))
                            await handle.aclose()
                            handle = None
                            form.files.remove(current_file)
                            os.unlink(current_file.path)
                            skipping = True
                        else:
                            await handle.write(event.data)
                    elif current_field is not None:
                        field_bytes.extend(event.data)
                        if len(field_bytes) > MAX_FIELD_BYTES:
                            raise BadRequest(f"Form field {current_field} is too large")
                    if not event.more_data:
                        if handle is not None:
                            await handle.aclose()
                            handle = None
                        if current_field is not None:
                            try:
                                form.fields[current_field] = field_bytes.decode("utf-8")
                            except UnicodeDecodeError:
                                raise BadRequest(f"Form field {current_field} is not valid UTF-8") from None
                        current_field, current_file = None, None
                elif isinstance(event, Epilogue):
                    break
        if handle is not None:
            raise BadRequest("Malformed multipart body: the body ended inside a part")
        return form
    except BaseException:
        form.cleanup()
        raise
    finally:
        if handle is not None:
            with trio.CancelScope(shield=True):
                await handle.aclose()


async def _with_end(body: AsyncIterator[bytes]) -> AsyncIterator[bytes | None]:
    async for chunk in body:
        if chunk:
            yield chunk
    yield None


async def spooled_chunks(path: Path, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as handle:
        while data := await handle.read(chunk_size):
            yield data
