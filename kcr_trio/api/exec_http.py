"""``POST /exec`` (``api-contract.md`` §2): read, check, run, and answer plainly or behind a heartbeat.

The handler reads the JSON body (bounded in size and time, authenticated by a key in it if there was
none in a header), runs every check that answers a 4xx *once*, before anything starts, then runs the
request with ``core.exec`` in the request's own nursery (``api.scope``), so a client that leaves
cancels it. Whether the answer is plain JSON or a committed ``200`` with heartbeats is decided by
``api.exec_commit`` and driven by ``api.commit_driver`` (timers, signals, heartbeats); this module
starts the run, reports its signals and builds the response.

``POST /exec`` is served by ``api.exec_fast`` below Quart, from the same framework-free pieces
(:func:`exec_request`, :func:`capture`, :func:`answer_of`, :func:`committed_body`; the fast path
runs the execution in the request task, ``api.exec_inline``, where :func:`start` gives it a task of
its own); this Quart route keeps the route in the OpenAPI document and is the reference the fast
path is tested against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

import outcome
import trio
from pydantic import ValidationError
from quart import Response, g, request

from kcr_trio.core.errors import ApiError, Busy, Unavailable
from kcr_trio.core.exec import ExecOutcome, ExecRequest, ExecService, Phases, check_refs, validate
from kcr_trio.core.languages import Language
from kcr_trio.core.model import FileRef
from kcr_trio.core.wire_shapes import ExecResponse

from .commit_driver import ACQUIRED, Acquired, Driver, heartbeats
from .errors import dumps
from .exec_commit import HEARTBEAT_HEADERS, AnswerNow, Commit, CommitPolicy, ExecCommit
from .exec_fields import parse_args, parse_timeout_ms
from .hooks import authenticate
from .json_body import read_json
from .models import ExecBody, validation_details
from .principal import Principal, current_principal
from .profiles import runtime_session
from .scope import RequestScope, current
from .services import Services, json_response, services, user_id_for

log = logging.getLogger("kcr_trio.api")

# The access-log/metrics outcome of an /exec result (a broken sandbox is "error", not "ok").
_OUTCOMES = {"timeout": "timeout", "error": "error"}

# What the run reports to the driver: its captured result, or that acquisition is decided.
Signal = outcome.Maybe[ExecOutcome] | Acquired


async def exec_route() -> Response:
    svc = services()
    rs = current(request.scope)
    raw = await read_json(svc.settings.kcr_max_json_body_bytes)
    if g.get("auth_pending"):
        await authenticate(svc.auth.body_key(raw))
    req, language = exec_request(svc, raw, rs.request_id, principal=current_principal(),
                                 profile=g.get("execution_profile"), user_header=request.headers.get("user-id", ""))
    return await respond(req, language)


def exec_request(svc: Services, raw: Any, request_id: str, *, principal: Principal | None, profile: str | None,
                 user_header: str) -> tuple[ExecRequest, Language]:
    """The checked run of a parsed body, or the 4xx that answers it: every check that answers a 4xx
    runs here, once, before anything starts. Framework-free, so the Quart route and the plain ASGI
    one (``api.exec_fast``) answer every body alike."""
    try:
        body = ExecBody.model_validate(raw)
    except ValidationError as exc:
        raise ApiError("Request validation failed", status=422, details=validation_details(exc)) from None
    # 400/413 before anything starts; the run is told, so the checks run once.
    language = validate(body.code, body.lang, svc.exec_service.limits)
    check_refs(len(body.files), svc.exec_service.limits)
    req = ExecRequest(
        code=body.code,
        lang=body.lang,
        request_id=request_id,
        session_id=body.session_id,
        entity_id=body.entity_id,
        user_id=user_id_for(principal, body.user_id, user_header),
        files=[FileRef(f.id, f.session_id, f.name) for f in body.files],
        args=parse_args(body.args),
        timeout=parse_timeout_ms(body.timeout),
        runtime_session_id=runtime_session(body.runtime_session_hint, profile,
                                           principal.id if principal is not None else None),
    )
    return req, language


async def respond(req: ExecRequest, language: Language) -> Response:
    """Start the run in the request's nursery; answer as ``api.exec_commit`` decides."""
    rs = current(request.scope)
    run, action = await start(services(), rs, req, language)
    if isinstance(action, AnswerNow):
        return json_response(plain_answer(run, rs))  # an ApiError raises: the error handler answers it
    return Response(committed_body(run, rs, req), status=200, content_type="application/json",
                    headers=HEARTBEAT_HEADERS)


Run = Driver[outcome.Maybe[ExecOutcome]]


async def start(svc: Services, rs: RequestScope, req: ExecRequest, language: Language) -> tuple[Run, AnswerNow | Commit]:
    """Start the run in the request's nursery and wait until the answer is decided: plain
    (``AnswerNow``) or a committed ``200`` (``Commit``)."""
    # Unbounded, yet it holds at most two signals: acquisition decided, then the result.
    send, receive = trio.open_memory_channel[Signal](math.inf)
    machine = ExecCommit(CommitPolicy.from_settings(svc.settings))
    phases = watched_phases(machine, send, rs)
    rs.nursery.start_soon(_run, svc.exec_service, req, language, phases, send)

    run: Run = Driver(machine, receive)
    action = await run.decide()
    if not isinstance(action, (AnswerNow, Commit)):
        raise AssertionError(f"unexpected action before the commit: {action}")
    return run, action


def watched_phases(machine: ExecCommit, send: trio.MemorySendChannel[Signal], rs: RequestScope) -> Phases:
    """The run's phases, published on ``rs`` (live: the log sees cut-short runs too), telling
    ``machine`` when acquisition is decided. Mostly that decision is only recorded (the grace timer
    keeps running): the machine is told directly, in the run's task, rather than waking whoever
    waits on ``send`` for nothing (a task switch on the answer's path). Only while the commit is
    held does it change what happens next: then it goes through ``send`` (:data:`ACQUIRED`)."""

    def acquisition_decided() -> None:
        if machine.records_acquisition():
            machine.acquisition_decided(trio.current_time())
        else:
            send.send_nowait(ACQUIRED)

    phases = Phases(on_acquisition_decided=acquisition_decided)
    rs.exec_phases, rs.phases = phases, phases.durations
    return phases


def plain_answer(run: Run, rs: RequestScope) -> ExecResponse:
    """The body of a plain answer; the run's ``ApiError`` raises here (its own status answers it)."""
    return answer_of(run.take(), rs)


def answer_of(result: outcome.Maybe[ExecOutcome], rs: RequestScope) -> ExecResponse:
    """The body of a plain answer to ``result``; its ``ApiError`` raises here."""
    answer = result.unwrap()
    rs.outcome = _OUTCOMES.get(answer.status, "ok")
    return answer.to_json()


def committed_body(run: Run, rs: RequestScope, req: ExecRequest) -> AsyncGenerator[bytes, None]:
    """Slow: the body of a committed ``200`` that keeps the connection audibly alive (keepalive.md,
    points 1 and 3): heartbeats, then the answer."""
    rs.heartbeat = True

    async def final(result: outcome.Maybe[ExecOutcome]) -> bytes:
        return _final_bytes(result, rs, req)

    return heartbeats(run, final)


def _final_bytes(result: outcome.Maybe[ExecOutcome], rs: RequestScope, req: ExecRequest) -> bytes:
    """The last bytes of a committed answer: the result, or its error as an error result."""
    if isinstance(result, outcome.Error):
        exc = result.error
        assert isinstance(exc, ApiError)  # _run maps everything else to Unavailable
        rs.outcome = "busy" if isinstance(exc, Busy) else "error"
        failed = ExecOutcome(session_id=req.session_id or "", stdout="", stderr=exc.message, status="error")
        return dumps(failed.to_json())
    answer = result.unwrap()
    rs.outcome = _OUTCOMES.get(answer.status, "ok")
    return dumps(answer.to_json())


async def _run(
    service: ExecService, req: ExecRequest, language: Language, phases: Phases,
    send: trio.MemorySendChannel[Signal],
) -> None:
    """The run in its own task, its result sent to the driver."""
    send.send_nowait(await capture(service, req, language, phases))


async def capture(service: ExecService, req: ExecRequest, language: Language,
                  phases: Phases) -> outcome.Maybe[ExecOutcome]:
    """The run itself, its result captured (cancellation is not captured)."""
    try:
        return outcome.Value(await service.execute(req, phases, checked=language))
    except ApiError as exc:
        return outcome.Error(exc)
    except Exception as exc:  # a bug: keep the request alive, report it readably
        log.exception("exec failed", extra={"request_id": req.request_id})
        return outcome.Error(Unavailable(f"Unexpected error during code execution: {type(exc).__name__}"))
