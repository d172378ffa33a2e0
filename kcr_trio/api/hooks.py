"""What runs around every handler: error answers, the content-type and auth check, response headers.

* **Errors** become JSON in KubeCodeRun's shapes (``api/errors.py``), never an HTML page: an
  ``ApiError`` with its own status, a routing error (404/405/408/413) with its message, anything
  unexpected as a logged 500.
* **Before each request**: a JSON route refuses a body type it cannot read (415), then the caller is
  authenticated (header key, JWT, trusted network) — except for a JSON body that carries its key
  itself, which the handler checks once it has read the body (``g.auth_pending``).
* **After each request**: security headers; the rate-limit headers of the tightest quota.
  (``Connection: close`` for LibreChat's axios requests is the ASGI edge's: ``api/connection_policy.py``.)

``install`` registers them (and the execution-profile hooks, ``api/profiles.py``, between the two,
so that the profile is checked after authentication).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quart import Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError, Busy, Unauthorized

from .anonymous import UnauthBudget
from .errors import error_body
from .principal import TRUSTED, Principal
from .profiles import install as install_profiles
from .ratelimit import Quota, RateLimited
from .scope import RequestScope, current
from .services import UNAUTH_BUDGET, Services, json_response, services

log = logging.getLogger("kcr_trio.api")

# Body types a JSON route accepts (LibreChat and its SDKs send all of these with JSON inside).
JSON_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded", "text/plain")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
# The messages of routing errors Quart raises itself (werkzeug's names otherwise).
HTTP_ERROR_MESSAGES = {404: "Not found", 405: "Method not allowed", 408: "Request body timeout",
                       413: "Request body too large"}


def install(app: Any, settings: Settings) -> None:
    app.extensions[UNAUTH_BUDGET] = UnauthBudget(settings.kcr_unauth_body_bytes,
                                                 settings.kcr_unauth_body_budget_bytes)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.before_request(content_type_and_auth)
    install_profiles(app, settings)  # X-CodeAPI-Expected-Profile: checked after authentication
    app.after_request(response_headers)


# -- errors ---------------------------------------------------------------------------------------


async def api_error(exc: ApiError) -> Response:
    return json_response(*error_answer(exc, current(request.scope)))


def error_answer(exc: ApiError, rs: RequestScope) -> tuple[dict[str, Any], int, dict[str, str]]:
    """The body, status and headers of an ``ApiError``'s answer, and what it records on the scope
    (shared with the plain ASGI routes, ``api.files_fast``)."""
    if isinstance(exc, Busy):
        rs.outcome = "busy"
    elif isinstance(exc, RateLimited):
        rs.extra["rate_limited"] = exc.limit
    return error_body(exc), exc.status, dict(exc.headers)


async def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {}
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    if status >= 500:
        current(request.scope).outcome = "error"
    message = HTTP_ERROR_MESSAGES.get(status, exc.name)
    return json_response(error_body(ApiError(message, status=status)), status, headers)


async def unexpected_error(exc: Exception) -> Response:
    return json_response(unexpected_answer(exc, current(request.scope)), 500)


def unexpected_answer(exc: BaseException, rs: RequestScope) -> dict[str, Any]:
    """Log a bug and give the body of its 500 (shared with ``api.files_fast``)."""
    log.exception("unexpected error", extra={"request_id": rs.request_id}, exc_info=exc)
    return error_body(ApiError("Internal server error", status=500))


# -- before and after every request ---------------------------------------------------------------


@dataclass
class Caller:
    """Who the auth check found: a principal (``None`` on exempt routes), the rate-limit quotas it
    used (``None`` when no limit applies), or ``pending``: the key travels in the JSON body."""

    principal: Principal | None = None
    quotas: list[Quota] | None = None
    pending: bool = False


async def check_key(svc: Services, key: str | None, peer: str | None) -> Caller:
    """Check the key; count wrong keys per IP and requests per key (``api.ratelimit``).

    A valid key always passes, whatever failed before from the same address: behind an ingress
    every client shares one peer IP, and wrong keys must never lock LibreChat out. Only failing
    requests are throttled (429 once their address has used up its failures).
    """
    limiter = svc.limiter if svc.limiter is not None and svc.limiter.active else None
    try:
        principal = svc.auth.check(key)
    except Unauthorized:
        if limiter is not None and key:
            limiter.check_blocked(peer)
            await limiter.auth_failed(peer)
        raise
    if limiter is not None and limiter.limits:
        return Caller(principal, await limiter.check_key(principal.id))  # a JWT principal outlives its tokens
    return Caller(principal)


async def authorise(svc: Services, method: str, path: str, peer: str | None, headers: Any,
                    key_in_body: Callable[[], bool]) -> Caller:
    """The auth decision for one request, framework-free: the Quart hook below and the plain ASGI
    routes (``api.files_fast``) both call it, so they answer every case alike. ``headers``: anything
    with a case-insensitive ``get``; ``key_in_body()``: whether a POST/PUT/PATCH body may carry the key."""
    auth = svc.auth
    if auth.is_exempt(method, path):
        return Caller()
    if auth.is_trusted(peer):
        return Caller(TRUSTED)
    key = auth.header_key(headers)
    if key is None and method in ("POST", "PUT", "PATCH") and key_in_body():
        return Caller(pending=True)  # the handler checks the key in the JSON body
    return await check_key(svc, key, peer)


async def authenticate(key: str | None) -> None:
    """``check_key`` for the current Quart request (a handler that read the key from its body)."""
    caller = await check_key(services(), key, _peer())
    g.principal = caller.principal
    if caller.quotas is not None:
        g.quotas = caller.quotas


async def content_type_and_auth() -> None:
    method, path = request.method, request.path
    rule = request.url_rule
    current(request.scope).route = rule.rule if rule is not None else None
    # No route (404/405): the content type cannot matter; the routing error answers.
    if rule is not None and method in ("POST", "PUT", "PATCH") and not path.startswith(("/upload", "/state/")):
        check_json_type(request.headers.get("content-type", ""))
    caller = await authorise(services(), method, path, _peer(), request.headers,
                             lambda: request.mimetype == "application/json")
    if caller.pending:
        g.auth_pending = True
    elif caller.principal is not None:
        g.principal = caller.principal
        if caller.quotas is not None:
            g.quotas = caller.quotas


def check_json_type(content_type: str) -> None:
    """415 for a body type a JSON route cannot read (shared with ``api.exec_fast``)."""
    if not any(t in content_type.lower() for t in JSON_TYPES):
        raise ApiError(f"Unsupported content type: {content_type}", status=415, shape="A")


def _peer() -> str | None:
    peer: str | None = (request.scope.get("client") or (None,))[0]
    return peer


def quota_headers(quotas: list[Quota] | None) -> dict[str, str]:
    """The tightest window's state, as a client would want to pace itself (none without quotas)."""
    if not quotas:
        return {}
    quota = min(quotas, key=lambda q: q.limit - q.used)
    return quota.headers(time.time())


async def response_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    for name, value in quota_headers(g.get("quotas")).items():
        response.headers.setdefault(name, value)
    return response
