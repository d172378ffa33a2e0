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
were written without their metadata are invisible and are deleted in a shielded ``finally``
(``core.files``). The file side of each phase (session choice, inputs, outputs) is ``core.staging``,
which programmatic tool calling (``core.ptc_engine``) uses too.

Errors before the run (bad input, busy, a store down) are ``ApiError``s the edge can still answer with
a real status. Program failures are results (HTTP 200, text in ``stderr``), as LibreChat expects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from . import output
from .errors import ApiError, Unavailable, empty_code, single_error, unsupported_language
from .interfaces import Executor, FileStore, Sandbox, SessionStore
from .languages import COMPILED, Language, lookup
from .model import FileRecord, FileRef, GeneratedFile, RunResult
from .names import is_plain_filename
from .runtime import RuntimeStore, Workspace
from .staging import Staging, deleted_names, mounts
from .wire_shapes import ArtifactDelivery, ExecFile, ExecResponse, artifact_delivery

log = logging.getLogger("kcr_trio.exec")


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
    # Compiled languages' compile steps get this much time of their own (0: none, the compile
    # shares the program's timeout); the request's deadline grows by it for those languages.
    compile_timeout: float = 0.0

    def compile_budget(self, language: str) -> float:
        return self.compile_timeout if language in COMPILED else 0.0


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
    files: list[ExecFile] = field(default_factory=list)
    # Contract §4.1/§4.2/§3.2, sent only when they say something (older clients never see them).
    deleted_files: list[str] = field(default_factory=list)
    artifact_delivery: ArtifactDelivery | None = None
    runtime_session_id: str | None = None
    runtime_status: Literal["new", "reused"] | None = None

    def to_json(self) -> ExecResponse:
        """The answer's JSON (``core.wire_shapes.ExecResponse``)."""
        body: ExecResponse = {
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
    _started: float = field(default=0.0, init=False, repr=False)

    def acquisition_decided(self) -> None:
        if self.on_acquisition_decided is not None:
            self.on_acquisition_decided()

    def phase(self, name: str) -> Phases:
        """``with phases.phase(name):`` times the block (phases do not nest). The object is its
        own context manager: a generator-based one cost ~8 Python calls per phase, 5 phases per
        ``/exec``, on a path where every call counts (issue 13: cold caches at c=1)."""
        self.current, self._started = name, time.perf_counter()
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        assert self.current is not None
        self.durations[self.current] = round((time.perf_counter() - self._started) * 1000, 2)
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
        # The file side of a run (session choice, inputs, outputs): public, for the PTC engine too.
        self.staging = Staging(sessions, files, limits)

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
        deadline = (trio.current_time() + limits.max_execution_time + limits.overhead
                    + limits.compile_budget(language.code))
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
                raise single_error(group) from None
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
            session, created = await self.staging.choose(req)
            state.session_id = session.session_id
            state.inputs = await self.staging.find_inputs(req, session, state.notes, created=created)
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
        # As ``async with``, entered above (``_entered``, inline: this is every run's path).
        try:
            phases.durations["acquire"] = round((time.perf_counter() - acquire_started) * 1000, 2)

            # 2. Inputs: store → sandbox (and the runtime workspace's files, newest first).
            notes = state.notes
            with phases.phase("upload"):
                sent = await self.staging.send_inputs(sandbox, mounts(state.inputs, ws), notes)

            # 3. Run. The sandbox enforces the timeout; keep time for collection after it.
            run_timeout = min(
                float(limits.max_execution_time),
                max(1.0, deadline - trio.current_time() - limits.overhead / 2
                    - limits.compile_budget(language.code)),
            )
            if req.timeout is not None:
                run_timeout = min(run_timeout, req.timeout)
            with phases.phase("execute"):
                result = await sandbox.run(req.code, timeout=run_timeout, request_id=req.request_id,
                                           args=req.args)

            # 4. Outputs: sandbox → store, then metadata; the workspace; what was deleted.
            with phases.phase("collect"):
                out = await self.staging.collect_outputs(sandbox, result, state.session_id, notes)
                stored_names = out.stored_names
                if ws is not None and not result.failure:
                    await self._commit_workspace(ws, sandbox, result, out.generated, notes)
                    stored_names = stored_names - set(ws.not_kept)
            deleted = deleted_names(req, state.inputs, sent, result)
        except BaseException as exc:
            if not await sandbox_cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            raise AssertionError("an executor's sandbox never swallows an error") from exc
        else:
            await sandbox_cm.__aexit__(None, None, None)

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
            session_id=state.session_id, stdout=stdout, stderr=stderr, status=status, files=out.files,
            deleted_files=deleted, artifact_delivery=artifact_delivery(out.attempted, len(stored_names)),
            runtime_session_id=ws.id if ws is not None else None,
            runtime_status=ws.status if ws is not None else None,
        )

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


__all__ = ["ExecLimits", "ExecOutcome", "ExecRequest", "ExecService", "Phases", "Unavailable", "validate"]
