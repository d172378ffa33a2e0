"""The file domain's storage rules: how a file becomes visible, and how it goes away.

One stored file lives in two stores: its bytes in the ``FileStore`` (under ``FileRecord.object_key``)
and its metadata in the ``SessionStore``. Readers (``/files``, ``/download``, ``/exec`` mounting) find
a file only through its metadata, so the order of the two writes decides what a reader can see:

* **Storing: bytes first, metadata last** (:func:`store_files`). Metadata is written only for bytes
  that are complete, so a listed file always has its content. A writer that fails or is cancelled
  half-way (an error, a client gone, the request's deadline) removes what it wrote, in a shielded
  clean-up bounded by ``CLEANUP_TIMEOUT``: metadata first (readers stop seeing the file), then the
  bytes. The same path serves uploads (all or nothing, :func:`store_uploads`) and a run's outputs
  (each file on its own, ``core.staging``).
* **Deleting one file: metadata first, bytes after** (:func:`delete_file`), and nothing at all when
  the file store is down, so a ``DELETE`` is never half-applied.
* **Purging a session: metadata, then bytes, then the session record** (:func:`purge_session`).

Every interrupted step leaves at worst *bytes without metadata*: invisible, and removed later by the
orphan sweeper (``backends/orphan_sweeper.py``) or the next purge. Never metadata without bytes.

The stores come in through the ``core.interfaces`` Protocols; nothing here does I/O of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal

import trio

from .errors import ApiError, single_error
from .ids import new_id
from .interfaces import Body, FileStore, SessionStore
from .model import FileRecord, utcnow
from .names import sanitize_filename

log = logging.getLogger("kcr_trio.files")

# How many files move between a store and a sandbox (or a spool) at once, per request: enough to
# overlap the round trips of a few object-store transfers, few enough that one request with many
# files does not take every connection of the store's pool from the requests beside it.
TRANSFER_CONCURRENCY = 4
# Deadline for a shielded clean-up of half-stored files. Shielded work outlives a client that left,
# so it must end on its own; a few deletes take well under a second on a healthy store, and what a
# clean-up cut short leaves behind is bytes without metadata (invisible, swept later).
CLEANUP_TIMEOUT = 5.0
# The folders a session's objects live in (``FileRecord.object_key``); a purge removes both.
SESSION_FOLDERS = ("uploads", "outputs")

# Where one file's bytes come from: an async context manager yielding its chunks (a sandbox's
# ``open_file``; for bytes already at hand, ``contextlib.nullcontext(chunks)``) or, for an upload's
# spool file, an ``interfaces.Spooled`` the store can send without copying it again. Entered only
# once the transfer has its slot, and left (also by cancellation) as soon as the bytes are stored.
Source = Callable[[], AbstractAsyncContextManager[Body]]


@dataclass(slots=True)
class Incoming:
    """One file to store: its record (``size`` is set from the bytes actually stored) and its bytes."""

    record: FileRecord
    source: Source


@dataclass(frozen=True, slots=True)
class Unsaved:
    """Files a best-effort store could not keep, and why. ``stage``: whether their bytes could not
    be fetched or stored (one file each), or their metadata could not be recorded (then their bytes
    were removed again)."""

    names: tuple[str, ...]
    reason: str
    stage: Literal["bytes", "metadata"]


@dataclass(slots=True)
class Stored:
    records: list[FileRecord] = field(default_factory=list)  # visible now, in the order given
    unsaved: list[Unsaved] = field(default_factory=list)


async def store_files(
    sessions: SessionStore,
    files: FileStore,
    items: Sequence[Incoming],
    *,
    max_bytes: int | None,
    all_or_nothing: bool,
    concurrency: int = TRANSFER_CONCURRENCY,
) -> Stored:
    """Store ``items``: every file's bytes (``concurrency`` at a time), then their metadata in order.

    ``all_or_nothing`` (uploads): any failure removes every file stored so far and is raised (an
    ``ApiError`` as itself, not in a group), so the client gets a real status and no partial upload.
    Otherwise (a run's outputs, which often follow a committed 200): a file whose bytes fail
    (``ApiError`` while fetching or storing them) is skipped, and if recording metadata fails, the
    files already recorded stay and the rest lose their bytes; both are reported in ``unsaved``.
    Cancellation and unexpected errors always remove everything this call stored, then propagate.
    """
    landed: list[tuple[int, FileRecord]] = []  # bytes stored (index in ``items``, record)
    visible: set[str] = set()  # file ids whose metadata was recorded
    result = Stored()
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def put(index: int, item: Incoming) -> None:
        async with limiter:
            record = item.record
            try:
                async with item.source() as chunks:
                    record.size = await files.put(
                        record.object_key, chunks, content_type=record.content_type, max_bytes=max_bytes
                    )
            except ApiError as exc:
                if all_or_nothing:
                    raise
                result.unsaved.append(Unsaved((record.filename,), exc.message, "bytes"))
                return
            landed.append((index, record))

    try:
        try:
            async with trio.open_nursery() as nursery:
                for index, item in enumerate(items):
                    nursery.start_soon(put, index, item)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        landed.sort(key=lambda pair: pair[0])
        # Metadata last: only now do the files become visible to /files, /download and /exec.
        for _, record in landed:
            await sessions.add_file(record)
            visible.add(record.file_id)
    except ApiError as exc:
        if all_or_nothing:
            await discard(sessions, files, [record for _, record in landed], metadata=True)
            raise
        lost = [record for _, record in landed if record.file_id not in visible]
        await discard(sessions, files, lost, metadata=False)
        result.unsaved.append(Unsaved(tuple(sorted(r.filename for r in lost)), exc.message, "metadata"))
    except BaseException:
        await discard(sessions, files, [record for _, record in landed], metadata=True)
        raise
    result.records = [record for _, record in landed if record.file_id in visible]
    return result


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file as the edge received it (its bytes already spooled: ``api/uploads.py``)."""

    filename: str  # as the client sent it; stored sanitised (contract §4.2)
    content_type: str
    size: int
    source: Source


async def store_uploads(
    sessions: SessionStore,
    files: FileStore,
    uploads: Sequence[Upload],
    *,
    entity_id: str | None,
    owner: str | None,
    max_bytes: int | None,
) -> tuple[str, list[FileRecord]]:
    """``/upload``: the entity's active session (KubeCodeRun main), else a new one; then every file
    under its sanitised name and a new id, all or nothing (:func:`store_files`). Returns the session
    id and the stored records, in the order given."""
    session = await sessions.find_entity_session(entity_id) if entity_id else None
    if session is None:
        session = await sessions.create_session(entity_id=entity_id, user_id=owner)
    items = [
        Incoming(
            FileRecord(
                session_id=session.session_id,
                file_id=new_id(),
                filename=sanitize_filename(upload.filename),
                content_type=upload.content_type,
                size=upload.size,
                created_at=utcnow(),
                kind="upload",
                owner=owner,
            ),
            upload.source,
        )
        for upload in uploads
    ]
    stored = await store_files(sessions, files, items, max_bytes=max_bytes, all_or_nothing=True)
    return session.session_id, stored.records


async def discard(
    sessions: SessionStore, files: FileStore, records: Sequence[FileRecord], *, metadata: bool
) -> None:
    """Remove files that must not stay, shielded and bounded: metadata first (when it may exist),
    then the bytes. If the metadata cannot be removed the bytes stay (a listed file is never left
    without content); bytes a failed clean-up leaves behind are found by the orphan sweeper. Errors
    are logged, never raised: the caller is already handling the failure that brought it here."""
    if not records:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        for record in records:
            try:
                if metadata:
                    await sessions.delete_file(record.session_id, record.file_id)
                await files.delete(record.object_key)
            except ApiError as exc:
                log.warning("clean-up of an unsaved file failed: %s", exc.message,
                            extra={"file_session": record.session_id, "file_id": record.file_id})


async def delete_file(sessions: SessionStore, files: FileStore, record: FileRecord) -> None:
    """Delete one stored file, never half-applied (audit finding 8).

    With the file store down nothing changes (its ``Unavailable`` is raised and the file stays
    listed). Then metadata first, so readers stop seeing the file at once; bytes a failing delete
    leaves behind have no metadata, and the orphan sweeper removes them.
    """
    await files.ping()
    await sessions.delete_file(record.session_id, record.file_id)
    try:
        await files.delete(record.object_key)
    except ApiError as exc:
        log.warning("delete: bytes left for the orphan sweeper: %s", exc.message,
                    extra={"file_session": record.session_id, "file_id": record.file_id})


async def purge_session(sessions: SessionStore, files: FileStore, session_id: str) -> int:
    """Remove one session's files and then the session itself; returns how many file records went.

    The order (KubeCodeRun's, so both servers can clean the same stores side by side): the file
    *metadata* first (readers stop seeing the files); then the objects, by record and by the
    session's folder prefixes (which also catches objects whose metadata expired or was never
    written); and the session record (with its index and entity memberships) last, so an
    interrupted purge leaves the session listed as expired and the next pass finishes it. Every
    step is idempotent: two cleaners may purge the same session at once.
    """
    records = await sessions.list_files(session_id)
    for record in records:
        await sessions.delete_file(session_id, record.file_id)
    for record in records:
        await files.delete(record.object_key)
    for folder in SESSION_FOLDERS:
        await files.delete_prefix(f"sessions/{session_id}/{folder}/")
    await sessions.forget_session(session_id)
    return len(records)


__all__ = [
    "CLEANUP_TIMEOUT", "TRANSFER_CONCURRENCY", "Incoming", "Source", "Stored", "Unsaved", "Upload",
    "delete_file", "discard", "purge_session", "store_files", "store_uploads",
]
