"""The HTTP routes of the LibreChat Code Interpreter API (``api-contract.md`` §2), on Quart-Trio.

Handlers stay thin: they validate, authenticate and translate; the domain work lives in
``core.exec`` (for ``/exec``) and in the stores. Work that must continue after a handler returns
(``/exec`` behind a heartbeat, a download streaming out) runs in the request's own nursery
(``api.scope``), so a client that leaves cancels it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from pydantic import ValidationError
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from kcr_trio import __version__
from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError, Busy, NotFound, TooLarge, Unauthorized, Unavailable
from kcr_trio.core.exec import ExecOutcome, ExecRequest, ExecService, Phases, check_refs, validate
from kcr_trio.core.ids import is_safe_id, new_id
from kcr_trio.core.interfaces import Executor, FileStore, SessionStore
from kcr_trio.core.model import FileRecord, FileRef, utcnow
from kcr_trio.core.names import content_disposition, guess_content_type, sanitize_filename

from . import ptc_http
from .anonymous import UnauthBudget
from .auth import Authenticator
from .errors import dumps, error_body
from .exec_fields import parse_args, parse_timeout_ms
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .models import ExecBody, validation_details
from .openapi import docs_page, openapi_document
from .principal import TRUSTED
from .profiles import install as install_profiles
from .profiles import runtime_session_for
from .ratelimit import RateLimited, RateLimiter
from .scope import current
from .uploads import ParsedForm, parse_multipart, spooled_chunks

log = logging.getLogger("kcr_trio.api")

JSON_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded", "text/plain")
# Paths LibreChat fetches with axios: answering them with Connection: close keeps a socket that axios
# tainted (keepalive.md) from ever being reused for /exec.
CLOSE_PREFIXES = ("/files/", "/download/", "/upload", "/sessions/")
# CORS for browser downloads, only when KCR_CORS_ORIGINS names origins (off by default, as in
# KubeCodeRun's ENABLE_CORS=false): LibreChat downloads server-side and needs none of it.
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "x-api-key, Content-Type",
    "Access-Control-Expose-Headers": "Content-Disposition",
}


def cors_headers(allowed: str, origin: str | None) -> dict[str, str]:
    """The CORS headers for a request from ``origin``, or none (CORS off or origin not allowed)."""
    origins = {o.strip() for o in allowed.split(",") if o.strip()}
    if "*" in origins:
        return {"Access-Control-Allow-Origin": "*", **CORS_HEADERS}
    if origin and origin in origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **CORS_HEADERS}
    return {}
# The access-log/metrics outcome of an /exec result (a broken sandbox is "error", not "ok").
_OUTCOMES = {"timeout": "timeout", "error": "error"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


@dataclass
class Services:
    settings: Settings
    sessions: SessionStore
    files: FileStore
    executor: Executor
    exec_service: ExecService
    auth: Authenticator
    spool_dir: Path
    warnings: list[str]
    metrics: Metrics | None = None
    limiter: RateLimiter | None = None
    ptc: Any = None  # core.ptc_engine.PtcEngine (programmatic tool calling)
    ptc_http: Any = None  # httpx client that forwards continuations to the owning replica


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status=status, content_type="application/json", headers=headers)


# Routes that need no handler deadline: /exec has its own; /health touches nothing that can hang
# (and is the liveness probe, so it stays as cheap as it can be).
_OWN_DEADLINE = frozenset({"/exec", "/health", "/exec/programmatic"})


class KcrQuart(QuartTrio):
    """Quart-Trio with one deadline per handler (``KCR_REQUEST_TIMEOUT``), answered as 504.

    ``/exec`` carries its own deadline (execution time + overhead, see ``core.exec``) and is left
    alone; uploads get the body timeout on top, since the body arrives inside the handler. A stuck
    store therefore costs a client at most this long, and the answer is a clean JSON 504, not a hang.
    Streaming bodies (downloads) continue after the handler returned and are not cut by it.
    """

    request_timeout: float = 30.0
    body_timeout: float = 60.0

    async def dispatch_request(self, request_context: Any = None) -> Any:
        path = request.path
        if path in _OWN_DEADLINE:
            return await super().dispatch_request(request_context)
        timeout = self.request_timeout + (self.body_timeout if path.startswith("/upload") else 0.0)
        with trio.move_on_after(timeout):
            return await super().dispatch_request(request_context)
        current(request.scope).outcome = "timeout"
        raise ApiError("Request timed out", status=504)


def create_app(svc: Services) -> QuartTrio:
    settings = svc.settings
    app = KcrQuart("kcr_trio")
    app.request_timeout = settings.kcr_request_timeout
    app.body_timeout = settings.kcr_body_timeout
    app.config.update(
        RESPONSE_TIMEOUT=None,  # /exec enforces its own deadline; Quart's would cut the heartbeat
        BODY_TIMEOUT=settings.kcr_body_timeout,
        MAX_CONTENT_LENGTH=None,  # enforced per route while streaming, with clear messages
        PROVIDE_AUTOMATIC_OPTIONS=True,
    )
    app.extensions["kcr"] = svc

    # -- errors ------------------------------------------------------------------------------

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        rs = current(request.scope)
        if isinstance(exc, Busy):
            rs.outcome = "busy"
        elif isinstance(exc, RateLimited):
            rs.extra["rate_limited"] = exc.limit
        headers = dict(exc.headers)
        return json_response(error_body(exc), exc.status, headers)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        messages = {404: "Not found", 405: "Method not allowed", 408: "Request body timeout",
                    413: "Request body too large"}
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        if status >= 500:
            current(request.scope).outcome = "error"
        return json_response(error_body(ApiError(messages.get(status, exc.name), status=status)), status, headers)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error", extra={"request_id": current(request.scope).request_id})
        return json_response(error_body(ApiError("Internal server error", status=500)), 500)

    # -- before/after every request ----------------------------------------------------------

    limiter = svc.limiter if svc.limiter is not None and svc.limiter.active else None
    unauth = UnauthBudget(settings.kcr_unauth_body_bytes, settings.kcr_unauth_body_budget_bytes)

    async def authenticate(key: str | None) -> None:
        """Check the key; count wrong keys per IP and requests per key (``api.ratelimit``).

        A valid key always passes, whatever failed before from the same address: behind an ingress
        every client shares one peer IP, and wrong keys must never lock LibreChat out. Only failing
        requests are throttled (429 once their address has used up its failures).
        """
        try:
            g.principal = principal = svc.auth.check(key)
        except Unauthorized:
            if limiter is not None and key:
                peer = (request.scope.get("client") or (None,))[0]
                limiter.check_blocked(peer)
                await limiter.auth_failed(peer)
            raise
        if limiter is not None and limiter.limits:
            g.quotas = await limiter.check_key(principal.id)  # a JWT principal outlives its tokens

    @app.before_request
    async def _content_type_and_auth() -> None:
        method, path = request.method, request.path
        rule = request.url_rule
        current(request.scope).route = rule.rule if rule is not None else None
        # No route (404/405): the content type cannot matter; the routing error answers.
        if rule is not None and method in ("POST", "PUT", "PATCH") and not path.startswith(("/upload", "/state/")):
            content_type = request.headers.get("content-type", "")
            if not any(t in content_type.lower() for t in JSON_TYPES):
                raise ApiError(f"Unsupported content type: {content_type}", status=415, shape="A")
        if svc.auth.is_exempt(method, path):
            return
        peer = (request.scope.get("client") or (None,))[0]
        if svc.auth.is_trusted(peer):
            g.principal = TRUSTED
            return
        key = svc.auth.header_key(request.headers)
        if key is not None:
            await authenticate(key)
        elif method in ("POST", "PUT", "PATCH") and request.mimetype == "application/json":
            g.auth_pending = True  # the handler checks the key in the JSON body
        else:
            await authenticate(None)

    install_profiles(app, settings)  # X-CodeAPI-Expected-Profile: checked after authentication

    @app.after_request
    async def _headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if settings.kcr_connection_close and request.path.startswith(CLOSE_PREFIXES):
            response.headers["Connection"] = "close"
        quotas = g.get("quotas")
        if quotas:  # the tightest window's state, as a client would want to pace itself
            quota = min(quotas, key=lambda q: q.limit - q.used)
            for name, value in quota.headers(time.time()).items():
                response.headers.setdefault(name, value)
        return response

    # -- /exec -------------------------------------------------------------------------------

    @app.post("/exec")
    async def exec_route() -> Response:
        rs = current(request.scope)
        raw = await _read_json(settings.kcr_max_json_body_bytes)
        if g.get("auth_pending"):
            await authenticate(svc.auth.body_key(raw))
        try:
            body = ExecBody.model_validate(raw)
        except ValidationError as exc:
            raise ApiError("Request validation failed", status=422, details=validation_details(exc)) from None
        validate(body.code, body.lang, svc.exec_service.limits)  # 400/413 before anything starts
        check_refs(len(body.files), svc.exec_service.limits)
        req = ExecRequest(
            code=body.code,
            lang=body.lang,
            request_id=rs.request_id,
            session_id=body.session_id,
            entity_id=body.entity_id,
            user_id=_user_id(body.user_id),
            files=[FileRef(f.id, f.session_id, f.name) for f in body.files],
            args=parse_args(body.args),
            timeout=parse_timeout_ms(body.timeout),
            runtime_session_id=runtime_session_for(body.runtime_session_hint),
        )
        return await _respond_exec(req)

    async def _respond_exec(req: ExecRequest) -> Response:
        """Answer plainly if the run finishes within the grace, else commit a heartbeat 200."""
        rs = current(request.scope)
        phases = Phases()
        rs.exec_phases, rs.phases = phases, phases.durations  # live: the log sees cut-short runs too
        done = trio.Event()
        box: dict[str, Any] = {}

        async def work() -> None:
            try:
                box["outcome"] = await svc.exec_service.execute(req, phases)
            except ApiError as exc:
                box["error"] = exc
            except Exception as exc:  # a bug: keep the request alive, report it readably
                log.exception("exec failed", extra={"request_id": req.request_id})
                box["error"] = Unavailable(f"Unexpected error during code execution: {type(exc).__name__}")
            finally:
                rs.phases = phases.durations
                done.set()

        rs.nursery.start_soon(work)
        if settings.kcr_heartbeat:
            with trio.move_on_after(settings.kcr_heartbeat_grace):
                await done.wait()
            # Still waiting for a sandbox? Then a Busy answer may yet come: keep the status open
            # (no byte sent) until acquisition is decided, but never past the hold cap, which stays
            # below the 5 s client idle timer so the socket is never killed for silence.
            hold = settings.kcr_commit_hold_max - settings.kcr_heartbeat_grace
            if not done.is_set() and not phases.acquired.is_set() and hold > 0:
                with trio.move_on_after(hold):
                    async with trio.open_nursery() as waiters:
                        async def first(event: trio.Event) -> None:
                            await event.wait()
                            waiters.cancel_scope.cancel()

                        waiters.start_soon(first, done)
                        waiters.start_soon(first, phases.acquired)
            if not done.is_set() and "error" not in box and phases.acquired.is_set():
                # Acquisition just failed: the error lands in ``box`` at once; wait for it.
                with trio.move_on_after(0.05):
                    await done.wait()
        else:
            await done.wait()

        if done.is_set():
            if "error" in box:
                raise box["error"]
            outcome: ExecOutcome = box["outcome"]
            rs.outcome = _OUTCOMES.get(outcome.status, "ok")
            return json_response(outcome.to_json())

        # Slow: commit 200 now and keep the connection audibly alive (keepalive.md, points 1 and 3).
        rs.heartbeat = True
        interval = settings.kcr_heartbeat_interval

        async def heartbeat_body() -> AsyncIterator[bytes]:
            yield b" "
            while not done.is_set():
                with trio.move_on_after(interval):
                    await done.wait()
                if not done.is_set():
                    yield b" "
            if "error" in box:
                exc: ApiError = box["error"]
                rs.outcome = "busy" if isinstance(exc, Busy) else "error"
                yield dumps(
                    ExecOutcome(session_id=req.session_id or "", stdout="", stderr=exc.message, status="error").to_json()
                )
            else:
                outcome = box["outcome"]
                rs.outcome = _OUTCOMES.get(outcome.status, "ok")
                yield dumps(outcome.to_json())

        return Response(
            heartbeat_body(),
            status=200,
            content_type="application/json",
            headers={"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"},
        )

    async def _read_json(limit: int) -> Any:
        data = bytearray()
        # Not yet authenticated (the key is in the body): bounded per request and globally.
        budget = unauth if g.get("auth_pending") else None
        held = 0
        try:
            if budget is not None and (request.content_length or 0) > budget.per_request:
                raise budget.too_large()
            with trio.move_on_after(settings.kcr_body_timeout) as scope:
                async for chunk in request.body:
                    if budget is not None:
                        budget.reserve(held, len(chunk))
                        held += len(chunk)
                    data.extend(chunk)
                    if len(data) > limit:
                        raise TooLarge(f"Request body too large: at most {limit} bytes")
        finally:
            if budget is not None:
                budget.release(held)
        if scope.cancelled_caught:
            raise ApiError("Request body timeout", status=408)
        try:
            value = json.loads(data.decode("utf-8"))
            # "\ud800" escapes decode to lone surrogates, which no UTF-8 consumer (the sidecar,
            # the stores, our own responses) can encode: refuse them here, with the field.
            if (b"\\ud" in data or b"\\uD" in data) and (where := _lone_surrogate(value, "body")):
                raise ApiError(
                    "Request validation failed",
                    status=422,
                    details=[{"field": where, "message": "Lone surrogate in string", "code": "string_unicode"}],
                )
            return value
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError deeply
            # nested arrays. All are the client's input, so 422, never a 500.
            if isinstance(exc, RecursionError):
                exc = ValueError("nested too deeply")
            raise ApiError(
                "Request validation failed",
                status=422,
                details=[{"field": "body", "message": f"Invalid JSON: {exc}", "code": "json_invalid"}],
            ) from None

    # -- /upload -----------------------------------------------------------------------------

    async def _parse_upload(batch: bool) -> ParsedForm:
        with trio.move_on_after(settings.kcr_body_timeout) as scope:
            form = await parse_multipart(
                request.body,
                request.headers.get("content-type", ""),
                spool_dir=svc.spool_dir,
                max_file_bytes=settings.max_file_bytes,
                max_files=settings.max_files_per_session,
                refuse_oversize=not batch,
            )
        if scope.cancelled_caught:
            raise ApiError("Request body timeout", status=408)
        return form

    async def _store_uploads(form: ParsedForm) -> tuple[str, list[FileRecord]]:
        entity_id = (form.fields.get("entity_id") or "").strip() or None
        owner = _user_id(form.fields.get("user_id"))
        session = await svc.sessions.find_entity_session(entity_id) if entity_id else None
        if session is None:
            session = await svc.sessions.create_session(entity_id=entity_id, user_id=owner)
        stored: list[FileRecord] = []
        try:
            for item in form.files:
                record = FileRecord(
                    session_id=session.session_id,
                    file_id=new_id(),
                    filename=sanitize_filename(item.filename),
                    content_type=item.content_type,
                    size=item.size,
                    created_at=utcnow(),
                    kind="upload",
                    owner=owner,
                )
                record.size = await svc.files.put(
                    record.object_key,
                    spooled_chunks(item.path),
                    content_type=record.content_type,
                    max_bytes=settings.max_file_bytes,
                )
                stored.append(record)
            for record in stored:  # metadata last: the files become visible only now
                await svc.sessions.add_file(record)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for record in stored:
                    await svc.sessions.delete_file(record.session_id, record.file_id)
                    await svc.files.delete(record.object_key)
            raise
        return session.session_id, stored

    @app.post("/upload")
    async def upload() -> Response:
        form = await _parse_upload(batch=False)
        try:
            if not form.files:
                raise _no_files()
            session_id, stored = await _store_uploads(form)
        finally:
            form.cleanup()
        return json_response(
            {
                "message": "success",
                "session_id": session_id,
                "storage_session_id": session_id,
                "files": [
                    {"filename": r.filename, "fileId": r.file_id, "size": r.size, "content_type": r.content_type}
                    for r in stored
                ],
            }
        )

    @app.post("/upload/batch")
    async def upload_batch() -> Response:
        form = await _parse_upload(batch=True)
        try:
            if not form.files and not form.refused:
                raise _no_files()
            session_id, stored = await _store_uploads(form)
        finally:
            form.cleanup()
        results = [{"status": "success", "fileId": r.file_id, "filename": r.filename} for r in stored]
        results += [
            {"status": "error", "filename": sanitize_filename(name), "error": reason} for name, reason in form.refused
        ]
        return json_response(
            {
                "message": "success" if not form.refused else "partial",
                "session_id": session_id,
                "storage_session_id": session_id,
                "files": results,
                "succeeded": len(stored),
                "failed": len(form.refused),
            }
        )

    # -- listings, freshness -----------------------------------------------------------------

    @app.get("/files/<session_id>")
    async def list_files(session_id: str) -> Response:
        detail = request.args.get("detail", "full")
        if not is_safe_id(session_id):
            return json_response([])
        records = await svc.sessions.list_files(session_id)
        if detail == "summary":
            session = await svc.sessions.get_session(session_id)
            now = utcnow()
            items = []
            for r in records:
                if session is not None and session.active:
                    stamp = now
                elif session is not None:
                    stamp = session.last_activity
                else:
                    stamp = r.created_at
                items.append({"name": f"{session_id}/{r.file_id}", "lastModified": _iso_ms(stamp)})
            return json_response(items)
        if detail == "simple":
            return json_response(
                [{"id": r.file_id, "name": sanitize_filename(r.filename), "path": r.path} for r in records]
            )
        return json_response(
            [
                {
                    "name": sanitize_filename(r.filename),
                    "id": r.file_id,
                    "session_id": session_id,
                    "content": None,
                    "size": r.size,
                    "lastModified": r.created_at.isoformat(),
                    "etag": f'"{r.file_id}"',
                    "metadata": {
                        "content-type": r.content_type,
                        "original-filename": sanitize_filename(r.filename),
                    },
                    "contentType": r.content_type,
                }
                for r in records
            ]
        )

    @app.get("/sessions/<session_id>/objects/<file_id>")
    async def freshness(session_id: str, file_id: str) -> Response:
        record = await _record_or_404(session_id, file_id)
        session = await svc.sessions.get_session(session_id)
        stamp = utcnow() if session is not None and session.active else record.created_at
        return json_response(
            {
                "lastModified": _iso_ms(stamp),
                "session_id": session_id,
                "storage_session_id": session_id,
                "file_id": file_id,
                "name": record.filename,
                "size": record.size,
            }
        )

    async def _record_or_404(session_id: str, file_id: str) -> FileRecord:
        record = None
        if is_safe_id(session_id) and is_safe_id(file_id):
            record = await svc.sessions.get_file(session_id, file_id)
        if record is None:
            raise NotFound("File not found")
        return record

    # -- download, delete --------------------------------------------------------------------

    # No automatic OPTIONS: the explicit route below answers the CORS preflight with 204.
    @app.get("/download/<session_id>/<file_id>", provide_automatic_options=False)
    async def download(session_id: str, file_id: str) -> Response:
        record = await _record_or_404(session_id, file_id)
        rs = current(request.scope)
        send, receive = trio.open_memory_channel[tuple[str, Any]](1)

        async def produce() -> None:
            # Opens, reads and closes the object in one task, owned by the request.
            async with send:
                try:
                    async with svc.files.open(record.object_key) as chunks:
                        await send.send(("open", None))
                        async for chunk in chunks:
                            await send.send(("data", chunk))
                except ApiError as exc:
                    await send.send(("error", exc))

        rs.nursery.start_soon(produce)
        kind, value = await receive.receive()
        if kind == "error":
            receive.close()
            raise value

        async def body() -> AsyncIterator[bytes]:
            async with receive:
                async for kind, value in receive:
                    if kind == "error":
                        raise RuntimeError(f"download aborted: {value.message}")
                    yield value

        headers = {
            "Content-Disposition": content_disposition(record.filename),
            "Cache-Control": "private, max-age=3600",
            "Content-Length": str(record.size),
            **cors_headers(settings.kcr_cors_origins, request.headers.get("origin")),
        }
        return Response(body(), status=200, content_type=guess_content_type(record.filename, record.content_type),
                        headers=headers)

    @app.route("/download/<session_id>/<file_id>", methods=["OPTIONS"])
    async def download_options(session_id: str, file_id: str) -> Response:
        cors = cors_headers(settings.kcr_cors_origins, request.headers.get("origin"))
        if not cors:
            return Response(b"", status=204, headers={"Allow": "GET, HEAD, OPTIONS"})
        return Response(b"", status=204, headers={**cors, "Access-Control-Max-Age": "3600"})

    @app.delete("/files/<session_id>/<file_id>")
    async def delete_file(session_id: str, file_id: str) -> Response:
        record = await _record_or_404(session_id, file_id)
        # Never half-applied (audit finding 8): with the file store down, change nothing (503, the
        # file stays listed). Then metadata first, so readers stop seeing the file at once; bytes
        # a failing delete leaves behind have no metadata and the orphan sweeper removes them.
        await svc.files.ping()
        await svc.sessions.delete_file(session_id, file_id)
        try:
            await svc.files.delete(record.object_key)
        except ApiError as exc:
            log.warning("delete: bytes left for the orphan sweeper: %s", exc.message,
                        extra={"file_session": session_id, "file_id": file_id})
        return Response(b"", status=200)

    # -- health ------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return json_response(
            {
                "status": "healthy",
                "version": __version__,
                "config": {"debug": False, "docs_enabled": settings.enable_docs, "cors_enabled": bool(settings.kcr_cors_origins.strip())},
            }
        )

    @app.get("/ready")
    async def ready() -> Response:
        checks: dict[str, Any] = {}
        ok = True
        timeout = settings.kcr_ready_timeout

        async def probe(name: str, fn: Any) -> None:
            # Each dependency gets its own deadline and its own verdict: one slow or broken store
            # makes the answer 503 with details, never a 500 and never a hang.
            nonlocal ok
            started = time.perf_counter()
            try:
                with trio.fail_after(timeout):
                    result = await fn()
                checks[name] = {"ok": True, **(result if isinstance(result, dict) else {})}
            except ApiError as exc:
                ok = False
                checks[name] = {"ok": False, "error": exc.message}
            except trio.TooSlowError:
                ok = False
                checks[name] = {"ok": False, "error": f"no answer within {timeout:g} s"}
            except Exception as exc:  # a backend bug: report it, keep serving
                log.exception("readiness check %s failed", name)
                ok = False
                checks[name] = {"ok": False, "error": f"unexpected error: {type(exc).__name__}"}
            checks[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, "sessions", svc.sessions.ping)
            nursery.start_soon(probe, "files", svc.files.ping)
            nursery.start_soon(probe, "executor", svc.executor.status)
        if checks.get("executor", {}).get("ready") is False:
            ok = False
        current(request.scope).outcome = "ok"  # a 503 here is an answer, not a server failure
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
        if svc.warnings:
            body["warnings"] = svc.warnings
        return json_response(body, 200 if ok else 503)

    if svc.ptc is not None:  # POST /exec/programmatic and /exec/programmatic/cancel
        ptc_http.register(app)

    # -- operations: metrics, OpenAPI, docs ---------------------------------------------------

    if svc.metrics is not None and settings.kcr_metrics_port is None:

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(await render_metrics(svc), status=200, content_type=METRICS_CONTENT_TYPE)

    if settings.enable_docs:
        cache: list[bytes] = []  # built on first use, when every route is registered

        @app.get("/openapi.json")
        async def openapi() -> Response:
            if not cache:
                cache.append(dumps(openapi_document(app, __version__)))
            return Response(cache[0], status=200, content_type="application/json")

        @app.get("/docs")
        async def docs() -> Response:
            return Response(docs_page("/openapi.json"), status=200, content_type="text/html; charset=utf-8")

    return app


async def render_metrics(svc: Services) -> bytes:
    """The exposition text, with pool gauges from the executor's status now (bounded wait)."""
    assert svc.metrics is not None
    status: dict[str, Any] | None = None
    with trio.move_on_after(svc.settings.kcr_ready_timeout):
        try:
            status = await svc.executor.status()
        except Exception:  # the executor's own problem shows in /ready; metrics still render
            log.warning("executor status failed during a metrics scrape", exc_info=True)
    return svc.metrics.render(status)


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The location (``body -> files -> 0 -> id``) of the first string holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key, where) is not None:
            return where
        found = _lone_surrogate(item, f"{where} -> {key}")
        if found is not None:
            return found
    return None


def _user_id(given: str | None) -> str | None:
    """The requesting user: ``user_id`` from the body or form, else LibreChat's ``User-Id`` header.

    A verified JWT's subject (LibreChat's user id) wins over both, since those are only asserted.
    Only used to tell one user's uploads from another's; bounded so it cannot bloat metadata.
    """
    principal = g.get("principal")
    if principal is not None and principal.scheme == "jwt" and principal.subject:
        return str(principal.subject)[:256]
    value = (given if isinstance(given, str) and given.strip() else request.headers.get("user-id", "")).strip()
    return value[:256] or None


def _no_files() -> ApiError:
    return ApiError(
        "No files provided",
        status=422,
        details=[{"field": "body -> file", "message": "Field required", "code": "missing"}],
    )


def _iso_ms(stamp: dt.datetime) -> str:
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


__all__ = ["Services", "create_app", "time"]
