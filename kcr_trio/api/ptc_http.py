"""HTTP edge of programmatic tool calling: ``POST /exec/programmatic`` and ``.../cancel`` (contract §1.3,
§1.4, §2).

Handlers validate, authenticate and route; the execution itself lives in ``core.ptc_engine``. Three
things happen only here:

* **Routing between replicas.** A continuation whose execution is owned by another live replica is
  forwarded there (its URL is in the shared state); if the owner is gone (no heartbeat, refused
  connection, or it no longer knows the execution) this replica claims the execution once and
  replays it from the stored history. A forwarded request carries ``X-KCR-PTC-Forwarded`` so it is
  never forwarded again.
* **Request ids and cancel.** Every POST's ``X-LibreChat-Code-Request-ID`` is recorded (a reuse is a
  409); cancel finds the execution through it, on any replica, and an id cancelled before its POST
  arrived leaves a tombstone that makes the POST answer the cancelled error.
* **The answer** (``api.ptc_answer``): plain within the grace, else a committed ``200`` behind
  heartbeats, decided by the same state machine as ``/exec``; a failure after the commit is written
  as ``{"status":"error",...}`` (§1.0.1), and a client that leaves before its answer cancels the
  execution: without the answer it could never continue it.

The principal is an opaque string from the auth layer: ``g.principal`` when an authenticator set
one (JWT subjects), else a hash of the API key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from quart import Response, g, request

from kcr_trio.api.principal import Principal
from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError
from kcr_trio.core.exec import ExecService
from kcr_trio.core.interfaces import PtcStore, SessionStore
from kcr_trio.core.ptc_engine import PtcEngine
from kcr_trio.core.ptc_state import (
    CANCELLED,
    MAX_RESULT_BYTES,
    REQUEST_ID,
    TOKEN_TTL,
    PtcState,
    apply_results,
    bad,
    canonical,
    not_found,
    parse_results,
    parse_start,
    parse_token,
)

from .json_body import read_body
from .ptc_answer import record, respond
from .services import json_response, services

log = logging.getLogger("kcr_trio.api.ptc")

PATH = "/exec/programmatic"
CANCEL_PATH = "/exec/programmatic/cancel"
FORWARDED = "x-kcr-ptc-forwarded"
UNKNOWN = "x-kcr-ptc-unknown"
MAX_BODY = 4 * MAX_RESULT_BYTES + 1024 * 1024  # one continuation may carry several large results


def register(app: Any) -> None:
    app.add_url_rule(PATH, "exec_programmatic", programmatic, methods=["POST"])
    app.add_url_rule(CANCEL_PATH, "exec_programmatic_cancel", cancel, methods=["POST"])


def _engine() -> PtcEngine:
    engine = services().ptc
    if engine is None:  # the routes are registered only with an engine (api/app_factory.py)
        raise AssertionError("PTC route without a PTC engine")
    return engine


def _forwarder() -> httpx.AsyncClient:
    client = services().ptc_http
    if client is None:  # open_ptc yields both or neither
        raise AssertionError("PTC engine without its forwarding client")
    return client


async def _read_json(limit: int) -> tuple[bytes, dict[str, Any]]:
    """The body as received (a forwarded continuation relays it as is) and its JSON object. Read by
    the edge's one body reader (size, time, the unauthenticated budget); the parse errors are this
    contract's 400s."""
    raw = await read_body(limit)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise bad("Request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad("Request body must be a JSON object")
    return raw, value


def principal_of(body: dict[str, Any]) -> str:
    """The authenticated principal's id (``api.principal``): a JWT user keeps it across token
    refreshes, so a continuation sent with a fresh token still belongs to its execution."""
    given = g.get("principal")
    if isinstance(given, Principal):
        return given.id
    if isinstance(given, str) and given:
        return given
    svc = services()
    key = svc.auth.header_key(request.headers) or svc.auth.body_key(body)
    if key:
        return Principal.for_key(key).id
    return "anonymous"  # a trusted network without a key


async def _authenticate(body: dict[str, Any]) -> None:
    if g.get("auth_pending"):
        auth = services().auth
        g.principal = auth.check(auth.body_key(body))


def _request_id() -> str | None:
    rid = request.headers.get("x-librechat-code-request-id")
    if rid is None:
        return None
    if not REQUEST_ID.match(rid):
        raise bad("X-LibreChat-Code-Request-ID must match ^[A-Za-z0-9_-]{16,128}$")
    return rid


# -- POST /exec/programmatic ------------------------------------------------------------------------
async def programmatic() -> Response:
    svc, engine = services(), _engine()
    raw, body = await _read_json(MAX_BODY)
    await _authenticate(body)
    principal = principal_of(body)
    forwarded = request.headers.get(FORWARDED) is not None
    rid = None if forwarded else _request_id()
    if rid is not None:
        existing = await engine.store.get_request(rid)
        if existing is not None and existing.get("status") == "cancelled":
            return json_response({"status": "error", "error": CANCELLED})
    if "continuation_token" in body:
        return await _continue(engine, raw, body, principal, rid, forwarded)
    if request.headers.get("x-librechat-code-workspace-id"):
        # Attached remote-bridge workspaces (§1.2) are not offered: a capability error tells the
        # model not to retry here, where a 400 would read as "fix your input".
        raise ApiError("unsupported_capability", status=409, shape="A")
    start = parse_start(body, svc.settings.max_execution_time)
    if len(canonical(body).encode("utf-8", "replace")) > 10 * 1024 * 1024:
        raise ApiError("Request too large: execution state exceeds 10485760 bytes", status=413, shape="A")
    await _claim_request_id(engine, rid, principal, None)
    live = await engine.start(start, principal)
    if rid is not None:
        await engine.store.set_request(rid, record(principal, live.state.execution_id, "active"), TOKEN_TTL)
    return await respond(engine, live, rid, principal)


async def _claim_request_id(engine: PtcEngine, rid: str | None, principal: str, eid: str | None) -> None:
    if rid is None:
        return
    existing = await engine.store.add_request(rid, record(principal, eid, "active"), TOKEN_TTL)
    if existing is not None:
        raise ApiError("Programmatic request ID is already in use", status=409, shape="A")


async def _continue(engine: PtcEngine, raw: bytes, body: dict[str, Any], principal: str, rid: str | None,
                    forwarded: bool) -> Response:
    eid, generation, nonce = parse_token(body.get("continuation_token"))
    results = parse_results(body.get("tool_results"))
    live = engine.executions.get(eid)
    state = live.state if live is not None else await engine.store.load(eid)
    if state is None or state.status == "cancelled" or (state.status != "done" and state.expires_at < time.time()):
        raise not_found()
    if state.principal != principal:
        raise ApiError("Forbidden", status=403, shape="A")
    if live is None and state.status != "done" and state.owner != engine.replica and not forwarded:
        relayed = await _forward(engine, state, raw)
        if relayed is not None:
            return relayed
    await _claim_request_id(engine, rid, principal, eid)
    if state.status == "done":  # only identical re-sends of the last round remain possible
        if apply_results(state, results):
            raise not_found()
        return json_response(state.last)
    if live is None:
        # The owner is gone (or we are the owner and lost it): replay here, claimed once.
        if not await engine.store.claim(eid, state.generation, engine.replica):
            raise ApiError("Another continuation of this execution is in progress", status=409, shape="A")
        live = engine.adopt(state)
        log.info("ptc execution taken over for replay", extra={"execution_id": eid})
    if live.busy:
        raise ApiError("Another continuation of this execution is in progress", status=409, shape="A")
    live.busy = True  # until this continuation's answer is out (``_respond`` releases it)
    try:
        current = generation == state.generation and nonce == state.nonce
        if not current and generation > state.generation:
            raise not_found()
        fresh = apply_results(state, results) if current else _resends_only(state, results)
    except BaseException:
        live.busy = False
        raise
    if not fresh:
        live.busy = False
        return json_response(state.last)
    state.status = "running"
    engine.resume(live, fresh)
    return await respond(engine, live, rid, principal)


def _resends_only(state: PtcState, results: list[dict[str, Any]]) -> list[Any]:
    """A stale token may only re-send results already recorded, identically (else 409)."""
    by_id = {c.id: c for c in state.calls}
    for entry in results:
        call = by_id.get(entry["call_id"])
        if call is None or not call.answered:
            raise ApiError("Stale continuation token", status=409, shape="A")
    apply_results(state, results)  # raises 409 on a different payload; records nothing new
    return []


async def _forward(engine: PtcEngine, state: PtcState, raw: bytes) -> Response | None:
    """Relay to the owning replica; ``None`` when it is gone (the caller replays)."""
    if not await engine.store.alive(state.owner):
        return None
    headers = {k: v for k, v in request.headers.items()
               if k.lower() in ("x-api-key", "authorization", "content-type", "user-agent",
                                "x-codeapi-expected-profile")}
    headers[FORWARDED] = engine.replica
    client = _forwarder()
    try:
        resp = await client.post(state.owner_url.rstrip("/") + PATH, content=raw, headers=headers,
                                 timeout=httpx.Timeout(None, connect=3.0))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        log.warning("ptc owner %s unreachable (%s): replaying here", state.owner_url, exc)
        return None
    except httpx.HTTPError as exc:
        raise ApiError(f"The replica running this execution failed: {type(exc).__name__}", status=503,
                       shape="A") from exc
    if resp.status_code == 404 and resp.headers.get(UNKNOWN):
        return None
    log.info("ptc continuation forwarded to its owner", extra={"execution_id": state.execution_id,
                                                               "owner": state.owner_url})
    return Response(resp.content.strip() or b"{}", status=resp.status_code, content_type="application/json")


# -- POST /exec/programmatic/cancel -----------------------------------------------------------------
async def cancel() -> Response:
    engine = _engine()
    raw, body = await _read_json(64 * 1024)
    await _authenticate(body)
    principal = principal_of(body)
    rid = body.get("request_id")
    if not isinstance(rid, str) or not REQUEST_ID.match(rid):
        raise bad("request_id must match ^[A-Za-z0-9_-]{16,128}$")
    found = await engine.store.get_request(rid)
    if found is None:
        await engine.store.set_request(rid, record(principal, None, "cancelled"), TOKEN_TTL)
        return json_response({"status": "cancellation_requested"}, 202)
    if found.get("principal") != principal:
        raise ApiError("Programmatic request belongs to another principal", status=403, shape="A")
    if found.get("status") == "done":
        return json_response({"status": "already_completed"})
    eid = found.get("execution_id")
    if isinstance(eid, str):
        live = engine.executions.get(eid)
        if live is not None:
            await engine.cancel(live)
        else:
            state = await engine.store.load(eid)
            if state is not None and state.owner != engine.replica and request.headers.get(FORWARDED) is None \
                    and await engine.store.alive(state.owner):
                await _forward_cancel(engine, state, raw)
            else:
                await engine.store.delete(eid)
    await engine.store.set_request(rid, record(principal, eid, "cancelled"), TOKEN_TTL)
    return json_response({"status": "cancellation_requested"}, 202)


async def _forward_cancel(engine: PtcEngine, state: PtcState, raw: bytes) -> None:
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("x-api-key", "authorization", "content-type")}
    headers[FORWARDED] = engine.replica
    try:
        await _forwarder().post(state.owner_url.rstrip("/") + CANCEL_PATH, content=raw, headers=headers,
                                   timeout=httpx.Timeout(5.0, connect=2.0))
    except httpx.HTTPError as exc:  # the owner vanished meanwhile: forget the state ourselves
        log.warning("ptc cancel forward failed (%s); deleting the state", exc)
        await engine.store.delete(state.execution_id)


# -- composition ------------------------------------------------------------------------------------
@asynccontextmanager
async def open_ptc(settings: Settings, sessions: SessionStore, exec_service: ExecService, nursery: trio.Nursery
                   ) -> AsyncIterator[tuple[PtcEngine | None, httpx.AsyncClient | None]]:
    """The engine (its runs owned by ``nursery``, the server's lifetime) and the forwarding client;
    neither when the executor's sandboxes have no PTC channel."""
    from kcr_trio.backends.ptc_sidecar import open_ptc_run, run_result
    from kcr_trio.backends.ptc_store import MemoryPtcStore, RedisPtcStore
    from kcr_trio.core.ids import new_id

    if not exec_service.executor.ptc_capable:  # no sidecar, no PTC channel
        yield None, None
        return
    store: PtcStore = MemoryPtcStore()
    if settings.kcr_session_store == "redis":  # shared by the replicas, on the sessions' client
        from kcr_trio.backends.redis_sessions import RedisSessionStore

        if not isinstance(sessions, RedisSessionStore):
            raise RuntimeError("KCR_SESSION_STORE=redis: the PTC store needs the Redis session store")
        store = RedisPtcStore(sessions.redis)
    url = settings.kcr_ptc_advertise_url or f"http://127.0.0.1:{settings.api_port}"
    capacity = exec_service.executor.capacity or 128  # pods: no fixed slot count
    max_suspended = settings.kcr_ptc_max_suspended
    engine = PtcEngine(exec_service, store, replica=new_id(), url=url, live=settings.kcr_ptc_live,
                       open_run=open_ptc_run, run_result=run_result, bash_settle=settings.kcr_ptc_bash_settle,
                       max_suspended=max(1, capacity // 2) if max_suspended is None else max_suspended,
                       suspend_max=settings.kcr_ptc_suspend_max)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
        await nursery.start(engine.serve)
        yield engine, client
