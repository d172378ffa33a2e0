"""The operations routes: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``, OpenAPI and docs.

``/health`` touches nothing that can hang: it is the liveness probe. ``/ready`` asks every backend,
each under its own deadline, and answers 503 with per-dependency details when one is down — never a
500, never a hang. ``/metrics`` is served here only when no separate metrics port is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Response, current_app, request

from kcr_trio import __version__
from kcr_trio.core.errors import ApiError

from .errors import dumps
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .openapi import docs_page, openapi_document
from .scope import current
from .services import Services, json_response, services

log = logging.getLogger("kcr_trio.api")

OPENAPI_CACHE = "kcr_openapi"  # app.extensions key of the encoded document, built on first use


def register(app: Any) -> None:
    app.add_url_rule("/health", "health", health, methods=["GET"])
    app.add_url_rule("/ready", "ready", ready, methods=["GET"])


def register_late(app: Any, svc: Services) -> None:
    """The routes registered after all others (their order in the url_map is kept as it was)."""
    if svc.metrics is not None and svc.settings.kcr_metrics_port is None:
        app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    if svc.settings.enable_docs:
        app.add_url_rule("/openapi.json", "openapi", openapi, methods=["GET"])
        app.add_url_rule("/docs", "docs", docs, methods=["GET"])


async def health() -> Response:
    settings = services().settings
    return json_response(
        {
            "status": "healthy",
            "version": __version__,
            "config": {"debug": False, "docs_enabled": settings.enable_docs,
                       "cors_enabled": bool(settings.kcr_cors_origins.strip())},
        }
    )


async def ready() -> Response:
    svc = services()
    checks: dict[str, Any] = {}
    timeout = svc.settings.kcr_ready_timeout

    async def probe(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        # Each dependency gets its own deadline and its own verdict: one slow or broken store
        # makes the answer 503 with details, never a 500 and never a hang.
        started = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                result = await fn()
            checks[name] = {"ok": True, **(result if isinstance(result, dict) else {})}
        except ApiError as exc:
            checks[name] = {"ok": False, "error": exc.message}
        except trio.TooSlowError:
            checks[name] = {"ok": False, "error": f"no answer within {timeout:g} s"}
        except Exception as exc:  # a backend bug: report it, keep serving
            log.exception("readiness check %s failed", name)
            checks[name] = {"ok": False, "error": f"unexpected error: {type(exc).__name__}"}
        checks[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, "sessions", svc.sessions.ping)
        nursery.start_soon(probe, "files", svc.files.ping)
        nursery.start_soon(probe, "executor", svc.executor.status)
    ok = all(check["ok"] for check in checks.values())
    if checks.get("executor", {}).get("ready") is False:
        ok = False
    current(request.scope).outcome = "ok"  # a 503 here is an answer, not a server failure
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": checks}
    if svc.warnings:
        body["warnings"] = svc.warnings
    return json_response(body, 200 if ok else 503)


async def metrics() -> Response:
    return Response(await render_metrics(services()), status=200, content_type=METRICS_CONTENT_TYPE)


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


async def openapi() -> Response:
    # Built on first use, when every route is registered; per app (tests build several).
    cached: bytes | None = current_app.extensions.get(OPENAPI_CACHE)
    if cached is None:
        cached = current_app.extensions[OPENAPI_CACHE] = dumps(openapi_document(current_app, __version__))
    return Response(cached, status=200, content_type="application/json")


async def docs() -> Response:
    return Response(docs_page("/openapi.json"), status=200, content_type="text/html; charset=utf-8")
