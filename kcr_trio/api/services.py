"""What every HTTP handler reaches through the app: the services, and a few per-request helpers.

Handlers are module-level functions (``api/*_http.py``), registered by ``api/app_factory.py``; they
find the backends as ``services()`` (the app's ``extensions["kcr"]``), never through a closure, so
each can be named, imported and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
from quart import Response, current_app, g, request

from kcr_trio.config import Settings
from kcr_trio.core.exec import ExecService
from kcr_trio.core.interfaces import Executor, FileStore, SessionStore
from kcr_trio.core.ptc_engine import PtcEngine

from .anonymous import UnauthBudget
from .auth import Authenticator
from .errors import dumps
from .metrics import Metrics
from .principal import Principal
from .ratelimit import RateLimiter

SERVICES = "kcr"  # app.extensions key of the Services
UNAUTH_BUDGET = "kcr_unauth"  # app.extensions key of the app's UnauthBudget (api/hooks.py)


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
    ptc: PtcEngine | None = None  # programmatic tool calling; None: its routes are off
    ptc_http: httpx.AsyncClient | None = None  # forwards continuations to the owning replica


def services() -> Services:
    """The services of the app serving the current request."""
    return cast(Services, current_app.extensions[SERVICES])


def unauth_budget() -> UnauthBudget:
    """The app's budget for bodies read before their key is checked (``api/anonymous.py``)."""
    return cast(UnauthBudget, current_app.extensions[UNAUTH_BUDGET])


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status=status, content_type="application/json", headers=headers)


def request_user_id(given: str | None) -> str | None:
    """The requesting user: ``user_id`` from the body or form, else LibreChat's ``User-Id`` header.

    A verified JWT's subject (LibreChat's user id) wins over both, since those are only asserted.
    Only used to tell one user's uploads from another's; bounded so it cannot bloat metadata.
    """
    return user_id_for(g.get("principal"), given, request.headers.get("user-id", ""))


def user_id_for(principal: Principal | None, given: str | None, header: str) -> str | None:
    """:func:`request_user_id` for an explicit principal and ``User-Id`` header (``""`` if none)."""
    if principal is not None and principal.scheme == "jwt" and principal.subject:
        return str(principal.subject)[:256]
    value = (given if isinstance(given, str) and given.strip() else header).strip()
    return value[:256] or None
