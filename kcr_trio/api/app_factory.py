"""Builds the Quart-Trio app: settings, the hooks, and the per-resource routes, nothing else.

The handlers are module-level functions in one module per resource; each reaches the backends
through the app (``api.services``):

=====================  ================================================================
``api.hooks``          error answers, content type and auth, response headers
``api.exec_http``      ``POST /exec`` (its commit/heartbeat decision: ``api.exec_commit``)
``api.files_http``     upload, listing, freshness, download, delete
``api.ops_http``       health, readiness, metrics, OpenAPI and docs
``api.ptc_http``       programmatic tool calling, when configured
=====================  ================================================================
"""

from __future__ import annotations

from typing import Any

import trio
from quart import request
from quart_trio import QuartTrio

from kcr_trio.core.errors import ApiError

from . import exec_http, files_http, hooks, ops_http, ptc_http
from .scope import RequestScope, current
from .services import SERVICES, Services

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
        timeout = handler_timeout(request.path, self.request_timeout, self.body_timeout)
        if timeout is None:
            return await super().dispatch_request(request_context)
        with trio.move_on_after(timeout):
            return await super().dispatch_request(request_context)
        raise timed_out(current(request.scope))


def handler_timeout(path: str, request_timeout: float, body_timeout: float) -> float | None:
    """The handler deadline of a path (``None``: the route keeps its own), as :class:`KcrQuart`
    applies it; the plain ASGI routes (``api.files_fast``) apply the same."""
    if path in _OWN_DEADLINE:
        return None
    return request_timeout + (body_timeout if path.startswith("/upload") else 0.0)


def timed_out(rs: RequestScope) -> ApiError:
    rs.outcome = "timeout"
    return ApiError("Request timed out", status=504)


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
    app.extensions[SERVICES] = svc
    hooks.install(app, settings)
    app.add_url_rule("/exec", "exec_route", exec_http.exec_route, methods=["POST"])
    files_http.register(app)
    ops_http.register(app)
    if svc.ptc is not None:  # POST /exec/programmatic and /exec/programmatic/cancel
        ptc_http.register(app)
    ops_http.register_late(app, svc)
    return app
