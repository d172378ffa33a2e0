"""The ``/exec`` lifecycle, top to bottom.

One request owns all of its work. Everything below runs inside the caller's cancel scope, which the
HTTP edge cancels when the client disconnects (and which carries the request's one deadline), so:

    choose session + find inputs      (before a sandbox is taken: lookups never hold capacity)
    acquire a sandbox
    stream inputs   store → sandbox   (concurrently, a few at a time)
    run the code                      (cancelling this kills the program's whole process tree)
    collect outputs sandbox → store   (bytes first, metadata last; concurrently)
    release the sandbox               (handed to the executor's own nursery: the answer does not
                                       wait for the teardown, which is shielded and bounded there)

A cancelled request therefore stops every phase at once and leaves no half-visible file: bytes that
were written without their metadata are invisible and are deleted in a shielded ``finally``.

Errors before the run (bad input, busy, a store down) are ``ApiError``s the edge can still answer with
a real status. Program failures are results (HTTP 200, text in ``stderr``), as LibreChat expects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import trio

from . import output
from .errors import ApiError, NotFound, Unavailable, empty_code, unsupported_language
from .ids import is_safe_id, new_id
from .interfaces import Executor, FileStore, Sandbox, SessionStore
from .languages import Language, lookup
from .model import FileRecord, FileRef, GeneratedFile, RunResult, Session, utcnow
from .names import guess_content_type, is_plain_filename, unique_name
from .runtime import RuntimeStore, Workspace

log = logging.getLogger("kcr_trio.exec")

# How many files move between store and sandbox at once, per request.
TRANSFER_CONCURRENCY = 4
# Deadline for the shielded clean-up of a half-stored output.
CLEANUP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ExecLimits:
    max_execution_time: float
    overhead: float  # time allowed on top of the run for store, transfer and acquisition phases
    acquire_timeout: float
    max_output_chars: int
    max_output_files: int
    max_file_bytes: int
    max_code_bytes: int
    # Also mount the requesting user's own uploads of the session the code runs in, not only the
    # listed refs. Fixes KubeCodeRun's "uploads vanish after the first generated file"
    # (api-contract.md §6.2 step 4) without showing one user's files to another.
    mount_session_uploads: bool = True
    # File refs one request may list (each costs store lookups before the run starts).
    max_file_refs: int = 100


@dataclass(slots=True)
class ExecRequest:
    code: str
    lang: str
    request_id: str
    session_id: str | None = None
    entity_id: str | None = None
    user_id: str | None = None
    files: list[FileRef] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # [args] the program's argv (contract §4.3)
    timeout: float | None = None  # seconds asked for this run; capped at MAX_EXECUTION_TIME
    runtime_session_id: str | None = None  # the stateful profile's workspace (core.runtime)


@dataclass(slots=True)
class ExecOutcome:
    session_id: str
    stdout: str
    stderr: str
    status: Literal["completed", "failed", "timeout", "error"]
    files: list[dict[str, Any]] = field(default_factory=list)
    # Contract §4.1/§4.2/§3.2, sent only when they say something (older clients never see them).
    deleted_files: list[str] = field(default_factory=list)
    artifact_delivery: dict[str, Any] | None = None
    runtime_session_id: str | None = None
    runtime_status: Literal["new", "reused"] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "files": self.files,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "has_state": False,
            "state_size": None,
            "state_hash": None,
        }
        if self.deleted_files:
            body["deleted_files"] = self.deleted_files
        if self.artifact_delivery is not None:
            body["artifact_delivery"] = self.artifact_delivery
        if self.runtime_session_id is not None:
            body["runtime_session_id"] = self.runtime_session_id
            body["runtime_status"] = self.runtime_status
        return body


@dataclass
class Phases:
    """Wall-clock milliseconds per phase, for the access log and metrics."""

    durations: dict[str, float] = field(default_factory=dict)
    current: str | None = None
    # Told once acquisition is decided (a sandbox is held, or getting one failed). The run does not
    # need it; an observer may: the HTTP edge holds its heartbeat commit until then, so that "busy"
    # can still be a real 503 (``api/exec_commit.py``).
    on_acquisition_decided: Callable[[], None] | None = None

    def acquisition_decided(self) -> None:
        if self.on_acquisition_decided is not None:
            self.on_acquisition_decided()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, self.current = time.perf_counter(), name
        try:
            yield
        finally:
            self.durations[name] = round((time.perf_counter() - start) * 1000, 2)
            self.current = None


def validate(code: Any, lang: Any, limits: ExecLimits) -> Language:
    """Checks that answer 400 before anything is committed."""
    language = lookup(lang) if isinstance(lang, str) else None
    if language is None:
        raise unsupported_language(str(lang))
    if not isinstance(code, str) or not code.strip():
        raise empty_code()
    if len(code.encode("utf-8", "surrogatepass")) > limits.max_code_bytes:
        raise ApiError(
            f"Code exceeds maximum size of {limits.max_code_bytes} bytes",
            status=413,
            details=[{"field": "code", "message": "Code too large", "code": "code_too_large"}],
        )
    return language


def check_refs(count: int, limits: ExecLimits) -> None:
    """413 for more file refs than one run may list: they are looked up before a sandbox is taken,
    and thousands of bogus refs would otherwise keep a request busy for many seconds."""
    if count > limits.max_file_refs:
        raise ApiError(
            f"Too many files: at most {limits.max_file_refs} file references per request",
            status=413,
            details=[{"field": "files", "message": "Too many file references", "code": "too_many_files"}],
        )



class ExecService:
    """Runs ``/exec`` requests against the three backends."""

    def __init__(
        self, sessions: SessionStore, files: FileStore, executor: Executor, limits: ExecLimits,
        runtime: RuntimeStore | None = None,
    ) -> None:
        self.sessions = sessions
        self.files = files
        self.executor = executor
        self.limits = limits
        self.runtime = runtime  # None: the stateful profile is not served

    async def execute(self, req: ExecRequest, phases: Phases, *, checked: Language | None = None) -> ExecOutcome:
        """Run one request. The caller's scope cancels it; its own deadline bounds it.

        ``checked``: the language :func:`validate` returned for this request, when the caller already
        ran both checks (the HTTP edge does, before it commits anything, to answer a real 4xx);
        else they run here.
        """
        language = checked
        if language is None:
            language = validate(req.code, req.lang, self.limits)
            check_refs(len(req.files), self.limits)
        limits = self.limits
        deadline = trio.current_time() + limits.max_execution_time + limits.overhead
        state = _State(session_id=req.session_id or "")
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                if req.runtime_session_id is None:
                    return await self._execute(req, language, phases, state, deadline, None)
                if self.runtime is None:
                    raise Unavailable("The stateful execution profile is not configured")
                with phases.phase("runtime"):
                    opened = self.runtime.open(req.runtime_session_id)
                    ws = await opened.__aenter__()
                async with _entered(opened, ws):
                    return await self._execute(req, language, phases, state, deadline, ws)
            except BaseExceptionGroup as group:
                raise _single(group) from None
        assert scope.cancelled_caught
        log.warning("exec deadline reached in phase %s", phases.current, extra={"request_id": req.request_id})
        # Say what really happened: only a deadline hit while the code ran is an execution timeout.
        stderr = output.timeout_message(limits.max_execution_time)
        cut = phases.current or next(reversed(phases.durations), None)
        if "execute" not in phases.durations and cut != "execute":
            stderr = (
                f"Request timed out after {limits.max_execution_time + limits.overhead:g} seconds while "
                f"{_PHASE_WORDS.get(cut or '', 'preparing the run')}; the code did not run"
            )
        return ExecOutcome(session_id=state.session_id, stdout="", stderr=stderr, status="timeout")

    async def _execute(
        self,
        req: ExecRequest,
        language: Language,
        phases: Phases,
        state: _State,
        deadline: float,
        ws: Workspace | None,
    ) -> ExecOutcome:
        limits = self.limits
        # 1. Session and input metadata, before a sandbox is taken: a slow or huge lookup must not
        #    hold execution capacity other requests are waiting for (audit finding 4).
        with phases.phase("store"):
            session = await self._choose_session(req)
            state.session_id = session.session_id
            state.inputs = await self._find_inputs(req, session, state.notes)
        wait = max(0.0, min(limits.acquire_timeout, deadline - trio.current_time()))
        acquire_started = time.perf_counter()
        phases.current = "acquire"
        # Leaving this block (normally, by error or by cancellation) releases the sandbox;
        # the executor shields that release and bounds it with its own timeout.
        try:
            sandbox_cm = self.executor.sandbox(language.code, wait=wait)
            sandbox = await sandbox_cm.__aenter__()
        finally:
            phases.acquisition_decided()
        async with _entered(sandbox_cm, sandbox):
            phases.durations["acquire"] = round((time.perf_counter() - acquire_started) * 1000, 2)

            # 2. Inputs: store → sandbox (and the runtime workspace's files, newest first).
            notes = state.notes
            mounts = _mounts(state.inputs, ws)
            with phases.phase("upload"):
                sent = await self._send_inputs(sandbox, mounts, notes)

            # 3. Run. The sandbox enforces the timeout; keep time for collection after it.
            run_timeout = min(
                float(limits.max_execution_time),
                max(1.0, deadline - trio.current_time() - limits.overhead / 2),
            )
            if req.timeout is not None:
                run_timeout = min(run_timeout, req.timeout)
            with phases.phase("execute"):
                result = await sandbox.run(req.code, timeout=run_timeout, request_id=req.request_id,
                                           args=req.args)

            # 4. Outputs: sandbox → store, then metadata; the workspace; what was deleted.
            with phases.phase("collect"):
                generated = await self._generated(sandbox, result)
                files, attempted, stored_names = await self._collect_outputs(
                    sandbox, generated, state.session_id, notes)
                if ws is not None and not result.failure:
                    await self._commit_workspace(ws, sandbox, result, generated, notes)
                    stored_names -= set(ws.not_kept)
            deleted = _deleted_names(req, state.inputs, sent, result)

        stdout, stderr = output.shape_output(
            result, limit=limits.max_output_chars, timeout=min(limits.max_execution_time, req.timeout or math.inf)
        )
        if notes:
            stderr = "\n".join([stderr, *notes]).strip()
        status: Literal["completed", "failed", "timeout", "error"]
        if result.failure:
            status = "error"
        elif result.timed_out:
            status = "timeout"
        else:
            status = "completed" if result.exit_code == 0 else "failed"
        return ExecOutcome(
            session_id=state.session_id, stdout=stdout, stderr=stderr, status=status, files=files,
            deleted_files=deleted, artifact_delivery=output.artifact_delivery(attempted, len(stored_names)),
            runtime_session_id=ws.id if ws is not None else None,
            runtime_status=ws.status if ws is not None else None,
        )

    # -- phase 1: session and inputs ---------------------------------------------------------

    async def _choose_session(self, req: ExecRequest) -> Session:
        """KubeCodeRun's order: explicit session, first ref's session, the entity's, a new one."""
        candidates = [req.session_id] if req.session_id else []
        candidates += [ref.session_id for ref in req.files]
        for sid in dict.fromkeys(candidates):
            if sid and is_safe_id(sid):
                session = await self.sessions.get_session(sid)
                if session is not None and session.active:
                    return session
        if req.entity_id:
            session = await self.sessions.find_entity_session(req.entity_id)
            if session is not None:
                return session
        return await self.sessions.create_session(entity_id=req.entity_id, user_id=req.user_id)

    async def _find_inputs(self, req: ExecRequest, session: Session, notes: list[str]) -> list[FileRecord]:
        """The files to mount, by ref (id, then name) and then the session's own uploads."""
        found: dict[str, FileRecord] = {}  # by mount name: unique, a clash gets a new name and a note
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
            found[self._mount_name(record, found, notes)] = record
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
                    found[self._mount_name(record, found, notes)] = record
        # The mount name is the record's filename from here on (a copy: the stored one is unchanged).
        return [record if record.filename == name else replace(record, filename=name) for name, record in found.items()]

    @staticmethod
    def _mount_name(record: FileRecord, found: dict[str, FileRecord], notes: list[str]) -> str:
        """The record's filename, made unique among the inputs: two inputs never shadow each other."""
        name = unique_name(record.filename, set(found))
        if name != record.filename:
            notes.append(
                f"Input file {record.filename} (id {record.file_id}) is at /mnt/data/{name}: "
                "another input has the same name"
            )
        return name

    # -- phase 2: inputs -----------------------------------------------------------------------

    async def _send_inputs(self, sandbox: Sandbox, inputs: dict[str, str], notes: list[str]) -> set[str]:
        """Mount ``{filename: object key}``; the names actually placed in the sandbox."""
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
            raise _single(group) from None
        return sent

    # -- phase 4: outputs ----------------------------------------------------------------------

    async def _generated(self, sandbox: Sandbox, result: RunResult) -> list[GeneratedFile]:
        if result.failure:
            return []
        return result.generated if result.generated is not None else await sandbox.generated_files()

    async def _commit_workspace(
        self, ws: Workspace, sandbox: Sandbox, result: RunResult, generated: list[GeneratedFile], notes: list[str]
    ) -> None:
        """Stateful profile: keep what the run wrote, forget what it removed (``core.runtime``)."""
        assert self.runtime is not None
        changed = [(g.name, g.size) for g in generated if is_plain_filename(g.name)]
        await self.runtime.commit(ws, sandbox, removed=set(result.removed or ()), changed=changed,
                                  max_file_bytes=self.limits.max_file_bytes)
        for name in ws.not_kept:
            notes.append(f"File {name} was not kept in the runtime session: workspace limits reached")

    async def _collect_outputs(
        self, sandbox: Sandbox, generated: list[GeneratedFile], session_id: str, notes: list[str]
    ) -> tuple[list[dict[str, Any]], int, set[str]]:
        """The stored outputs' refs, how many outputs were attempted, and the names stored."""
        if not generated:
            return [], 0, set()
        kept, skipped = output.select_outputs(
            generated, max_files=self.limits.max_output_files, max_bytes=self.limits.max_file_bytes
        )
        notes.extend(skipped)
        stored: list[tuple[int, FileRecord]] = []
        added: set[str] = set()
        limiter = trio.CapacityLimiter(TRANSFER_CONCURRENCY)

        async def store(index: int, item: GeneratedFile) -> None:
            async with limiter:
                record = FileRecord(
                    session_id=session_id,
                    file_id=new_id(),
                    filename=item.name,
                    content_type=guess_content_type(item.name, item.content_type),
                    size=0,
                    created_at=utcnow(),
                    kind="output",
                )
                try:
                    async with sandbox.open_file(item.name) as chunks:
                        record.size = await self.files.put(
                            record.object_key,
                            chunks,
                            content_type=record.content_type,
                            max_bytes=self.limits.max_file_bytes,
                        )
                except ApiError as exc:
                    # A file we cannot fetch is reported as missing, never stored as placeholder text.
                    notes.append(f"Output file {item.name} was not saved: {exc.message}")
                    return
                stored.append((index, record))

        try:
            try:
                async with trio.open_nursery() as nursery:
                    for index, item in enumerate(kept):
                        nursery.start_soon(store, index, item)
            except BaseExceptionGroup as group:
                raise _single(group) from None
            # Metadata last: only now do the files become visible to /files and /download.
            for _, record in sorted(stored, key=lambda pair: pair[0]):
                await self.sessions.add_file(record)
                added.add(record.file_id)
        except ApiError as exc:
            # A store failed after the run (often after the heartbeat committed a 200): the
            # program's output is still the answer. Files whose metadata landed are complete and
            # returned; the others lose their bytes and are named in stderr (audit finding 7).
            lost = [record for _, record in stored if record.file_id not in added]
            await self._discard(lost, metadata=False)
            names = ", ".join(sorted(r.filename for r in lost)) or "the generated files"
            notes.append(f"Output files {names} were not saved: {exc.message}")
            stored = [(i, r) for i, r in stored if r.file_id in added]
        except BaseException:
            await self._discard([record for _, record in stored], metadata=True)
            raise
        refs = [
            {
                "id": record.file_id,
                "name": record.filename,
                "path": None,
                "session_id": session_id,
                "storage_session_id": session_id,
            }
            for _, record in sorted(stored, key=lambda pair: pair[0])
        ]
        # [artifact_delivery] kept + left out for limits = attempted.
        return refs, output.attempted_outputs(generated), {record.filename for _, record in stored}

    async def _discard(self, records: list[FileRecord], *, metadata: bool) -> None:
        """Remove unsaved outputs, shielded and bounded: metadata first (if it may exist), then the
        bytes. If the metadata cannot be removed the bytes stay (a listed file is never left
        without content); bytes a failed clean-up leaves behind are found by the orphan sweeper."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            for record in records:
                try:
                    if metadata:
                        await self.sessions.delete_file(record.session_id, record.file_id)
                    await self.files.delete(record.object_key)
                except ApiError as exc:
                    log.warning("clean-up of an unsaved output failed: %s", exc.message)


def _mounts(inputs: list[FileRecord], ws: Workspace | None) -> dict[str, str]:
    """``{filename: object key}`` to mount: the request's inputs and, in a runtime session, its
    workspace; for a name in both, the newer copy (a file re-uploaded after the workspace last
    changed it wins; otherwise the workspace's own, latest, state)."""
    mounts = {record.filename: record.object_key for record in inputs}
    if ws is not None:
        created = {record.filename: record.created_at.timestamp() for record in inputs}
        for name, item in ws.files.items():
            if name not in created or item.stored_at >= created[name]:
                mounts[name] = item.key
    return mounts


def _deleted_names(req: ExecRequest, inputs: list[FileRecord], sent: set[str], result: RunResult) -> list[str]:
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


_PHASE_WORDS = {
    "runtime": "waiting for another call of the same runtime session",
    "store": "looking up the session and input files",
    "acquire": "waiting for a sandbox",
    "upload": "copying input files into the sandbox",
}


@asynccontextmanager
async def _entered(cm: Any, value: Any) -> AsyncIterator[Any]:
    """Exit an already-entered async context manager when this block ends (also on error)."""
    try:
        yield value
    except BaseException as exc:
        if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await cm.__aexit__(None, None, None)


@dataclass(slots=True)
class _State:
    session_id: str
    inputs: list[FileRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for stderr: renamed inputs, dropped outputs


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one meaningful error inside a nursery's exception group.

    Trio wraps even a single failure in a group; the edge wants the ``ApiError`` itself. Cancelled
    is never returned from here (the enclosing scope handles it): we prefer an ApiError, then any
    other non-Cancelled exception, and otherwise give the group back untouched.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if any(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return group
    for leaf in leaves:
        if isinstance(leaf, ApiError):
            return leaf
    if len(leaves) == 1:
        return leaves[0]
    return group


__all__ = ["ExecLimits", "ExecOutcome", "ExecRequest", "ExecService", "Phases", "Unavailable", "validate"]
