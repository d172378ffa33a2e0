"""``GET /health`` and ``GET /ready`` answered below Quart: the probes' cheap path.

Liveness and readiness probes arrive every few seconds from every kubelet and load balancer, and
need none of what Quart sets up per request (request and app contexts, URL matching, before/after
hooks, the handler deadline): they take no body, need no key (``auth.EXEMPT_PATHS``) and are never
rate limited. Profiled on Hypercorn, Quart's part was about a third of a ``/health`` request's CPU.
So :class:`RequestScopeMiddleware` (``api.scope``) hands ``GET``/``HEAD`` of these two paths to the
plain ASGI handlers here instead of the app. Everything the request scope gives stays: the request
id, the access-log line, the metrics, disconnect handling.

The answers are the same as the Quart routes would give: the same JSON, the same security and
profile headers. Other methods (``OPTIONS``, a ``POST`` answered 405) still go through Quart, which
also keeps both routes in the OpenAPI document.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from kcr_trio import __version__
from kcr_trio.core.errors import ApiError

from .errors import dumps
from .scope import current

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("kcr_trio.api.probes")

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def health_body(svc: Services) -> dict[str, Any]:
    settings = svc.settings
    return {
        "status": "healthy",
        "version": __version__,
        "config": {"debug": False, "docs_enabled": settings.enable_docs,
                   "cors_enabled": bool(settings.kcr_cors_origins.strip())},
    }


async def ready_report(svc: Services) -> tuple[int, dict[str, Any]]:
    """Probe every dependency concurrently, each under its own deadline: one slow or broken store
    makes the answer 503 with details, never a 500 and never a hang."""
    checks: dict[str, Any] = {}
    ok = True
    timeout = svc.settings.kcr_ready_timeout

    async def probe(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
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
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
    if svc.warnings:
        body["warnings"] = svc.warnings
    return (200 if ok else 503), body


def app_headers(svc: Services) -> list[tuple[bytes, bytes]]:
    """What ``hooks.response_headers`` and ``profiles`` add to every app answer to a request that is
    not an ``/exec``: the security headers and the execution profile served by default."""
    from .hooks import SECURITY_HEADERS
    from .profiles import ACTUAL_HEADER, served_profiles

    headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
    headers.append((ACTUAL_HEADER.lower().encode(), served_profiles(svc.settings)[0].encode()))
    return headers


def probe_routes(svc: Services) -> dict[str, Asgi]:
    """The plain ASGI handlers, by path, for :class:`api.scope.RequestScopeMiddleware`."""
    headers = app_headers(svc)
    health = dumps(health_body(svc))  # fixed for the server's lifetime

    async def answer(scope: dict[str, Any], send: Any, route: str, status: int, body: bytes) -> None:
        rs = current(scope)
        rs.route, rs.outcome = route, "ok"  # a 503 from /ready is an answer, not a server failure
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})

    async def health_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(scope, send, "/health", 200, health)

    async def ready_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        status, body = await ready_report(svc)
        await answer(scope, send, "/ready", status, dumps(body))

    return {"/health": health_app, "/ready": ready_app}
