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
from typing import Any

from quart import Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError, Busy, Unauthorized

from .anonymous import UnauthBudget
from .errors import error_body
from .principal import TRUSTED
from .profiles import install as install_profiles
from .ratelimit import RateLimited
from .scope import current
from .services import UNAUTH_BUDGET, json_response, services

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
    rs = current(request.scope)
    if isinstance(exc, Busy):
        rs.outcome = "busy"
    elif isinstance(exc, RateLimited):
        rs.extra["rate_limited"] = exc.limit
    return json_response(error_body(exc), exc.status, dict(exc.headers))


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
    log.exception("unexpected error", extra={"request_id": current(request.scope).request_id})
    return json_response(error_body(ApiError("Internal server error", status=500)), 500)


# -- before and after every request ---------------------------------------------------------------


async def authenticate(key: str | None) -> None:
    """Check the key; count wrong keys per IP and requests per key (``api.ratelimit``).

    A valid key always passes, whatever failed before from the same address: behind an ingress
    every client shares one peer IP, and wrong keys must never lock LibreChat out. Only failing
    requests are throttled (429 once their address has used up its failures).
    """
    svc = services()
    limiter = svc.limiter if svc.limiter is not None and svc.limiter.active else None
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


async def content_type_and_auth() -> None:
    method, path = request.method, request.path
    rule = request.url_rule
    current(request.scope).route = rule.rule if rule is not None else None
    # No route (404/405): the content type cannot matter; the routing error answers.
    if rule is not None and method in ("POST", "PUT", "PATCH") and not path.startswith(("/upload", "/state/")):
        content_type = request.headers.get("content-type", "")
        if not any(t in content_type.lower() for t in JSON_TYPES):
            raise ApiError(f"Unsupported content type: {content_type}", status=415, shape="A")
    auth = services().auth
    if auth.is_exempt(method, path):
        return
    peer = (request.scope.get("client") or (None,))[0]
    if auth.is_trusted(peer):
        g.principal = TRUSTED
        return
    key = auth.header_key(request.headers)
    if key is not None:
        await authenticate(key)
    elif method in ("POST", "PUT", "PATCH") and request.mimetype == "application/json":
        g.auth_pending = True  # the handler checks the key in the JSON body
    else:
        await authenticate(None)


async def response_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    quotas = g.get("quotas")
    if quotas:  # the tightest window's state, as a client would want to pace itself
        quota = min(quotas, key=lambda q: q.limit - q.used)
        for name, value in quota.headers(time.time()).items():
            response.headers.setdefault(name, value)
    return response
