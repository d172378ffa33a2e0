"""``GET /files/{session_id}`` answered below Quart, as the probes are (``api.probes``).

LibreChat primes every file it shows with ``GET /files/{sid}?detail=summary``: it is the busiest
route after ``/exec``. Profiled on Hypercorn, Quart's share of such a request (request and app
contexts, URL matching, the before/after hooks, the handler deadline wrapper) was about a quarter of
its CPU, more than the listing itself. So :class:`api.scope.RequestScopeMiddleware` hands ``GET`` of
``/files/<one segment>`` to :func:`listing_app` instead of the app.

Nothing about the answer differs, because nothing is re-implemented here: the auth decision and the
rate limits (``hooks.authorise``), the quota headers (``hooks.quota_headers``), the error bodies and
what they record (``hooks.error_answer``, ``hooks.unexpected_answer``), the handler deadline
(``app_factory.handler_timeout``/``timed_out``), the listing itself (``files_http.listing``) and the
headers every answer carries (``probes.app_headers``) are the functions the Quart path calls. The
request scope still gives the request id, the access line and the metrics; the ASGI wrappers above
it (connection policy, early answers) see the same messages. ``HEAD``, ``OPTIONS`` and every other
method still go through Quart (405s, ``Allow``, OpenAPI). ``tests/integration/ops/test_files_fast.py``
asks the same questions of both paths and compares the answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio

from kcr_trio.core.errors import ApiError

from .app_factory import handler_timeout, timed_out
from .errors import dumps
from .files_http import listing
from .hooks import authorise, error_answer, quota_headers, unexpected_answer
from .probes import app_headers
from .scope import current

if TYPE_CHECKING:
    from .anonymous import UnauthBudget
    from .services import Services

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

ROUTE = "/files/<session_id>"  # the url_map's template: the access line's and the metrics' label
_PREFIX = "/files/"
_KEY_HEADERS = (b"x-api-key", b"authorization")


def is_listing(method: str, path: str) -> bool:
    """``GET /files/<session_id>``: exactly one non-empty segment after the prefix, as Quart's
    default converter matches it."""
    return method == "GET" and path.startswith(_PREFIX) and len(path) > len(_PREFIX) and "/" not in path[len(_PREFIX):]


def _key_headers(raw: Any) -> dict[str, str]:
    """The headers the auth check reads, by lower-case name, first occurrence (as werkzeug's
    ``Headers.get`` returns them; h11 hands names over lower-cased)."""
    found: dict[str, str] = {}
    for name, value in raw:
        if name in _KEY_HEADERS and name.decode() not in found:
            found[name.decode()] = value.decode("latin-1")
    return found


def _detail(query: bytes) -> str:
    """``request.args.get("detail", "full")``: the first ``detail`` value, percent-decoded."""
    if query == b"detail=summary":  # what LibreChat sends: no parse needed
        return "summary"
    if b"detail" not in query:
        return "full"
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "detail":
            return value
    return "full"


def listing_app(svc: Services) -> Asgi:
    common = app_headers(svc)
    plain = [(name, value) for name, value in common if name not in (b"content-type", b"content-length")]
    settings = svc.settings
    timeout = handler_timeout(ROUTE, settings.kcr_request_timeout, settings.kcr_body_timeout)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        rs = current(scope)
        rs.route = ROUTE
        path: str = scope["path"]
        quotas = None
        headers: dict[str, str] = {}
        try:
            caller = await authorise(svc, "GET", path, (scope.get("client") or (None,))[0],
                                     _key_headers(scope.get("headers", ())), lambda: False)
            quotas = caller.quotas
            with trio.move_on_after(timeout if timeout is not None else float("inf")) as deadline:
                body: Any = await listing(svc.sessions, path[len(_PREFIX):], _detail(scope.get("query_string", b"")))
                status = 200
            if deadline.cancelled_caught:
                raise timed_out(rs)
        except ApiError as exc:
            body, status, headers = error_answer(exc, rs)
        except Exception as exc:  # a bug: logged, answered 500 like the app's own handler does
            body, status, headers = unexpected_answer(exc, rs), 500, {}
        data = dumps(body)
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if headers or quotas:
            out += [(name.lower().encode(), value.encode("latin-1")) for name, value in headers.items()]
            # The app's after-request hooks: set-if-absent for security and quota headers, the profile last.
            given = {name for name, _ in out}
            for name, value in quota_headers(quotas).items():
                if name.lower().encode() not in given:
                    out.append((name.lower().encode(), value.encode("latin-1")))
            out += [(name, value) for name, value in common if name not in given]
        else:  # the common case, the same list built once
            out += plain
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": data})

    return app


def fast_router(svc: Services, exec_budget: UnauthBudget | None = None) -> Callable[[str, str], Asgi | None]:
    """The routes :class:`api.scope.RequestScopeMiddleware` answers below Quart: ``GET``/``HEAD`` of
    the probes (``api.probes``), ``GET`` of the file listing and, given the app's budget for
    unauthenticated bodies, ``POST /exec`` (``api.exec_fast``)."""
    from . import exec_fast
    from .probes import probe_routes

    probes = probe_routes(svc)
    files = listing_app(svc)
    run = exec_fast.exec_app(svc, exec_budget) if exec_budget is not None else None

    def route(method: str, path: str) -> Asgi | None:
        if run is not None and exec_fast.is_exec(method, path):
            return run
        if method == "GET" and is_listing(method, path):
            return files
        if method in ("GET", "HEAD"):
            return probes.get(path)
        return None

    return route
