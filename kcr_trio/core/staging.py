"""A run's files: which session it uses, what it sees in ``/mnt/data``, and what it leaves behind.

This is the public file-side API of one run, shared by ``/exec`` (``core.exec``) and programmatic
tool calling (``core.ptc_engine``), so both resolve refs, mount inputs and store outputs the same way:

    choose_session(req)                    the session the run's outputs go to (contract §2.1)
    find_inputs(req, session, notes)       the files to mount, before any sandbox is taken
    mounts(inputs, workspace)              {name in /mnt/data: object key}
    send_inputs(sandbox, mounts, notes)    store → sandbox, a few at a time
    collect_outputs(sandbox, result, ...)  sandbox → store, bytes first and metadata last
                                           (``core.files.store_files``), as ``/exec`` file entries
    deleted_names(req, inputs, sent, result)  ``deleted_files`` (contract §4.2)

``notes`` collects what the model should read in ``stderr`` (a renamed input, a missing file, an
output not saved): the run goes on, and says why something is not where it was expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import output
from .errors import NotFound, single_error
from .files import TRANSFER_CONCURRENCY, Incoming, store_files
from .ids import is_safe_id, new_id
from .interfaces import FileStore, Sandbox, SessionStore
from .model import FileRecord, GeneratedFile, RunResult, Session, utcnow
from .names import guess_content_type, unique_name
from .wire_shapes import ExecFile, exec_file

if TYPE_CHECKING:
    from .exec import ExecLimits, ExecRequest
    from .runtime import Workspace

log = logging.getLogger("kcr_trio.exec")


@dataclass(slots=True)
class Collected:
    """What output collection stored, for the answer and the workspace."""

    files: list[ExecFile]  # the answer's ``files``, in the order the run listed them
    attempted: int  # outputs the run tried to deliver ([artifact_delivery])
    stored_names: set[str]  # names of the outputs stored
    generated: list[GeneratedFile]  # everything the run created or changed


class Staging:
    """The file side of runs, against the session and file stores (``core.interfaces``)."""

    def __init__(self, sessions: SessionStore, files: FileStore, limits: ExecLimits) -> None:
        self.sessions = sessions
        self.files = files
        self.limits = limits

    # -- before the sandbox: session and inputs ------------------------------------------------

    async def choose_session(self, req: ExecRequest) -> Session:
        """KubeCodeRun's order: explicit session, first ref's session, the entity's, a new one."""
        return (await self.choose(req))[0]

    async def choose(self, req: ExecRequest) -> tuple[Session, bool]:
        """:meth:`choose_session`, and whether the session was created for this request (then
        it holds no file yet: its id has not been handed to anyone)."""
        if req.session_id or req.files:
            candidates = [req.session_id] if req.session_id else []
            candidates += [ref.session_id for ref in req.files]
            for sid in dict.fromkeys(candidates):
                if sid and is_safe_id(sid):
                    session = await self.sessions.get_session(sid)
                    if session is not None and session.active:
                        return session, False
        if req.entity_id:
            session = await self.sessions.find_entity_session(req.entity_id)
            if session is not None:
                return session, False
        return await self.sessions.create_session(entity_id=req.entity_id, user_id=req.user_id), True

    async def find_inputs(self, req: ExecRequest, session: Session, notes: list[str], *,
                          created: bool = False) -> list[FileRecord]:
        """The files to mount, by ref (id, then name) and then the session's own uploads. Each
        record's ``filename`` is its mount name (unique: a clash gets a new name and a note).
        ``created``: the session was created for this request (``choose``), so it has no uploads
        to list: most ``/exec`` calls (no session, no files) then make no store call here."""
        if not req.files and created:
            return []
        found: dict[str, FileRecord] = {}  # by mount name
        seen: set[tuple[str, str]] = set()
        listings: dict[str, list[FileRecord]] = {}
        for ref in req.files:
            if not is_safe_id(ref.session_id):
                log.warning("skipping file ref with invalid session id", extra={"request_id": req.request_id})
                notes.append(f"Input file {ref.name} was not loaded: invalid session id")
                continue
            record = await self.sessions.get_file(ref.session_id, ref.id) if is_safe_id(ref.id) else None
            if record is None:
                if ref.session_id not in listings:
                    listings[ref.session_id] = await self.sessions.list_files(ref.session_id)
                record = next(
                    (
                        r
                        for r in listings[ref.session_id]
                        if r.filename == ref.name or r.filename == ref.id or r.file_id == ref.id
                    ),
                    None,
                )
            if record is None:
                log.warning(
                    "file ref not found; skipped",
                    extra={"request_id": req.request_id, "file_session": ref.session_id, "file_id": ref.id},
                )
                notes.append(f"Input file {ref.name} was not loaded: no such file in session {ref.session_id}")
                continue
            key = (record.session_id, record.file_id)
            if key in seen:
                continue
            seen.add(key)
            found[_mount_name(record, found, notes)] = record
        if self.limits.mount_session_uploads:
            # Only the requesting user's own uploads: a session is shared by everyone who uploads
            # with the same entity id (an agent), and another user's file is mounted only when the
            # request lists it. Without a user id on either side, only id-less uploads match.
            # A listed file wins its name over an unlisted one (typically an older copy of it).
            listed = set(found)
            for record in await self.sessions.list_files(session.session_id):
                key = (record.session_id, record.file_id)
                if record.kind != "upload" or record.owner != req.user_id or record.filename in listed:
                    continue
                if key not in seen:
                    seen.add(key)
                    found[_mount_name(record, found, notes)] = record
        # The mount name is the record's filename from here on (a copy: the stored one is unchanged).
        return [record if record.filename == name else replace(record, filename=name) for name, record in found.items()]

    # -- into the sandbox ----------------------------------------------------------------------

    async def send_inputs(self, sandbox: Sandbox, inputs: dict[str, str], notes: list[str]) -> set[str]:
        """Mount ``{filename: object key}``; the names actually placed in the sandbox."""
        if not inputs:
            return set()  # most runs: no limiter, no nursery
        limiter = trio.CapacityLimiter(TRANSFER_CONCURRENCY)
        sent: set[str] = set()

        async def send(filename: str, key: str) -> None:
            async with limiter:
                try:
                    async with self.files.open(key) as chunks:
                        await sandbox.put_file(filename, chunks)
                    sent.add(filename)
                except NotFound:
                    # KubeCodeRun would mount placeholder text; the program is better served by the
                    # file being absent and the model being told why.
                    notes.append(f"Input file {filename} could not be loaded: its content is missing")

        try:
            async with trio.open_nursery() as nursery:
                for filename, key in inputs.items():
                    nursery.start_soon(send, filename, key)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        return sent

    # -- out of the sandbox --------------------------------------------------------------------

    async def collect_outputs(
        self, sandbox: Sandbox, result: RunResult, session_id: str, notes: list[str]
    ) -> Collected:
        """Store what the run generated under ``session_id`` (within the output limits).

        Each file on its own (``core.files.store_files`` best effort): this usually runs after the
        heartbeat committed a 200, so the program's output is the answer whatever the stores do.
        Files that could not be saved are named in ``notes`` and counted in ``attempted``.
        """
        generated: list[GeneratedFile] = []
        if not result.failure:
            generated = result.generated if result.generated is not None else await sandbox.generated_files()
        if not generated:
            return Collected([], 0, set(), generated)
        kept, skipped = output.select_outputs(
            generated, max_files=self.limits.max_output_files, max_bytes=self.limits.max_file_bytes
        )
        notes.extend(skipped)
        items = [
            Incoming(
                FileRecord(
                    session_id=session_id,
                    file_id=new_id(),
                    filename=item.name,
                    content_type=guess_content_type(item.name, item.content_type),
                    size=0,
                    created_at=utcnow(),
                    kind="output",
                ),
                partial(sandbox.open_file, item.name),
            )
            for item in kept
        ]
        stored = await store_files(
            self.sessions, self.files, items, max_bytes=self.limits.max_file_bytes, all_or_nothing=False
        )
        for unsaved in stored.unsaved:
            # A file we cannot fetch is reported as missing, never stored as placeholder text; a
            # store failing after the run loses those files' bytes and names them (audit finding 7).
            if unsaved.stage == "bytes":
                notes.append(f"Output file {unsaved.names[0]} was not saved: {unsaved.reason}")
            else:
                names = ", ".join(unsaved.names) or "the generated files"
                notes.append(f"Output files {names} were not saved: {unsaved.reason}")
        return Collected(
            files=[exec_file(record) for record in stored.records],
            attempted=output.attempted_outputs(generated),  # kept + left out for limits
            stored_names={record.filename for record in stored.records},
            generated=generated,
        )


def mounts(inputs: list[FileRecord], ws: Workspace | None) -> dict[str, str]:
    """``{filename: object key}`` to mount: the request's inputs and, in a runtime session, its
    workspace; for a name in both, the newer copy (a file re-uploaded after the workspace last
    changed it wins; otherwise the workspace's own, latest, state)."""
    found = {record.filename: record.object_key for record in inputs}
    if ws is not None:
        created = {record.filename: record.created_at.timestamp() for record in inputs}
        for name, item in ws.files.items():
            if name not in created or item.stored_at >= created[name]:
                found[name] = item.key
    return found


def deleted_names(req: ExecRequest, inputs: list[FileRecord], sent: set[str], result: RunResult) -> list[str]:
    """``deleted_files`` (contract §4.2): the names of mounted inputs this run removed, as the
    request named them (so LibreChat can match its refs), plus removed workspace files. An input
    mounted under another name (a clash, see ``_mount_name``) is matched by its file id."""
    removed = set(result.removed or ()) & sent
    if not removed:
        return []
    mounted_as = {record.file_id: record.filename for record in inputs}
    names: list[str] = []
    reported: set[str] = set()
    for ref in req.files:
        mount = mounted_as.get(ref.id, ref.name.rsplit("/", 1)[-1])
        if mount in removed and ref.name not in names:
            names.append(ref.name)
            reported.add(mount)
    # Workspace files and session uploads mounted without a ref of their own.
    return names + sorted(removed - reported)


def _mount_name(record: FileRecord, found: dict[str, FileRecord], notes: list[str]) -> str:
    """The record's filename, made unique among the inputs: two inputs never shadow each other."""
    name = unique_name(record.filename, set(found))
    if name != record.filename:
        notes.append(
            f"Input file {record.filename} (id {record.file_id}) is at /mnt/data/{name}: "
            "another input has the same name"
        )
    return name


__all__ = ["Collected", "Staging", "deleted_names", "mounts"]
