"""The operations routes: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``, OpenAPI and docs.

``/health`` touches nothing that can hang: it is the liveness probe. ``/ready`` asks every backend,
each under its own deadline, and answers 503 with per-dependency details when one is down — never a
500, never a hang. Both answers are built in ``api.probes``, which also serves their GET and HEAD
below Quart (the probes' cheap path). ``/metrics`` is served here only when no separate metrics port is configured.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from quart import Response, current_app, request

from kcr_trio import __version__

from .errors import dumps
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .openapi import docs_page, openapi_document
from .probes import health_body, ready_report
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
    """Quart's copy: GET and HEAD are answered by ``api.probes`` below Quart; the route stays for
    the OpenAPI document and for the other methods' answers (405, OPTIONS)."""
    return json_response(health_body(services()))


async def ready() -> Response:
    status, body = await ready_report(services())
    current(request.scope).outcome = "ok"  # a 503 here is an answer, not a server failure
    return json_response(body, status)


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
