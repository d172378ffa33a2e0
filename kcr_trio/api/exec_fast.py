"""``POST /exec`` answered below Quart, as the probes and the file listing are (``api.files_fast``).

``/exec`` is the route LibreChat waits on, and at one request at a time the server's own edge is a
visible part of its latency: measured on an idle machine, about 1.7 ms of the server's ~5 ms per
``print('hi')`` was outside the run's phases, and Quart's share of that (request and app contexts,
the body task and its queue, URL matching, the before/after hooks, the response object and its
headers) was the largest piece. So :class:`api.scope.RequestScopeMiddleware` hands ``POST /exec``
to :func:`exec_app` instead of the app.

Nothing about the answer differs, because nothing is re-implemented here; every decision is the
function the Quart route calls, in the order the Quart route calls it:

1. the body type (``hooks.check_json_type``, 415) and the auth decision with its rate limits
   (``hooks.authorise``; a key in the JSON body: ``hooks.check_key`` once the body is read);
2. the execution profile (``profiles.resolve``, 400/409), as the profile hook runs after auth;
3. the body, under the same bounds (``json_body.BodyLimits``: the size limit, the unauthenticated
   budget shared with the app, the body timeout) and the same parse (``json_body.parse_json``);
4. the run's checks and request (``exec_http.exec_request``: 422, 400, 413), the run and the
   commit/heartbeat decision (the same machine, driven with the run in the request task:
   ``api.exec_inline.run_here``; ``exec_http.answer_of``, ``committed_body``);
5. errors as the app's handlers answer them (``hooks.error_answer``, ``hooks.unexpected_answer``),
   with the headers Quart's response carries, in its order: the error's own headers, the content
   type and length, the security headers, the quota headers, the execution profile.

The request scope still gives the request id, the access line, the metrics and the nursery; the
ASGI wrappers above it (early answers, ambiguous framing) see the same messages. A task reads the
connection once the body is in, as Quart's body task does, so a client that leaves cancels the run.
``OPTIONS``, ``HEAD`` and other methods still go through Quart (405, ``Allow``, OpenAPI).
``tests/integration/ops/test_exec_fast.py`` asks the same questions of both paths and compares the
answers byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import trio
from werkzeug.http import parse_options_header
from werkzeug.sansio.utils import get_content_length

from kcr_trio.core.errors import ApiError

from .errors import dumps
from .exec_commit import HEARTBEAT_HEADERS
from .exec_http import answer_of, exec_request
from .exec_inline import Committed, run_here
from .hooks import (
    SECURITY_HEADERS,
    authorise,
    check_json_type,
    check_key,
    error_answer,
    quota_headers,
    unexpected_answer,
)
from .json_body import BodyLimits, body_timeout, parse_json
from .profiles import ACTUAL_HEADER, EXPECTED_HEADER, resolve, served_profiles
from .scope import current

if TYPE_CHECKING:
    from .anonymous import UnauthBudget
    from .principal import Principal
    from .ratelimit import Quota
    from .services import Services

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

ROUTE = "/exec"
_EXPECTED = EXPECTED_HEADER.lower()
# The request headers this route reads, by their lower-case names (h11 hands names over lower-cased).
_READ = frozenset({"x-api-key", "authorization", "content-type", "content-length", "transfer-encoding",
                   "user-id", _EXPECTED})
_JSON = (b"content-type", b"application/json")
_SECURITY = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
_SECURITY_NAMES = frozenset(name for name, _ in _SECURITY)
_NONE: dict[str, str] = {}


def is_exec(method: str, path: str) -> bool:
    """``POST /exec`` exactly (looked up per request, so tests can switch the fast path off)."""
    return method == "POST" and path == ROUTE


def _headers(raw: Any) -> dict[str, str]:
    """The headers this route reads, first occurrence by lower-case name (werkzeug's ``get``)."""
    found: dict[str, str] = {}
    for name, value in raw:
        text = name.decode("latin-1")
        if text in _READ and text not in found:
            found[text] = value.decode("latin-1")
    return found


def response_headers(extra: dict[str, str], length: int | None, quotas: list[Quota] | None,
                     profile: str) -> list[tuple[bytes, bytes]]:
    """The headers Quart sends with an answer, in its order: the answer's own (an error's
    ``Retry-After``, the heartbeat's cache headers), ``content-type`` (and ``content-length`` when
    sized), then what the after-request hooks add if absent (security, quota) and the profile."""
    out = [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    out.append(_JSON)
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    given = {name for name, _ in out}
    out += [header for header in _SECURITY if header[0] not in given] if given & _SECURITY_NAMES else _SECURITY
    if quotas:
        given = {name for name, _ in out}
        for name, value in quota_headers(quotas).items():
            if name.lower().encode() not in given:
                out.append((name.lower().encode(), value.encode()))
    out.append((ACTUAL_HEADER.lower().encode(), profile.encode()))
    return out


async def _read_body(receive: Any, bounds: BodyLimits, timeout: float, expected: int | None) -> bytes:
    """The request body from the ASGI messages, under ``bounds`` (413/503) and ``timeout`` (408).

    Hypercorn hands a body that arrived whole over as its bytes, then an empty last message. A
    bound that refuses the bytes of a body that is in fact complete (``expected``: its announced
    length) takes that last message too before answering, as Quart's body task has by then: the
    answer then keeps its connection, as the Quart route's does. A body still arriving is refused
    at once and the answer closes the connection (``api.wire.CloseOnEarlyAnswer``)."""
    chunks: list[bytes] = []
    received = 0
    with trio.move_on_after(timeout) as deadline:
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect: the request scope cancels us
                await trio.lowlevel.checkpoint()
                continue
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if chunk:
                received += len(chunk)
                try:
                    bounds.add(chunk)
                except ApiError:
                    if more and expected is not None and received >= expected:
                        await receive()
                    raise
                chunks.append(chunk)
            if not more:
                break
    if deadline.cancelled_caught:
        raise body_timeout()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _watch(receive: Any) -> None:
    """Read the connection until the client leaves: the request scope's ``receive`` then cancels
    the request (and with it the run), as Quart's body task makes it do."""
    while (await receive())["type"] != "http.disconnect":
        pass


def exec_app(svc: Services, budget: UnauthBudget) -> Asgi:
    """The plain ASGI ``POST /exec``; ``budget``: the app's budget for unauthenticated bodies."""
    settings = svc.settings
    served = served_profiles(settings)
    limit, timeout = settings.kcr_max_json_body_bytes, settings.kcr_body_timeout
    auth = svc.auth

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        rs = current(scope)
        rs.route = ROUTE
        headers = _headers(scope["headers"])
        peer: str | None = (scope.get("client") or (None,))[0]
        profile = served[0]
        quotas: list[Quota] | None = None
        committed: Committed | None = None
        try:
            content_type = headers.get("content-type", "")
            check_json_type(content_type)
            caller = await authorise(svc, "POST", ROUTE, peer, headers,
                                     lambda: parse_options_header(content_type)[0].lower() == "application/json")
            principal: Principal | None = caller.principal
            quotas = caller.quotas
            profile = resolve(headers.get(_EXPECTED), served)
            bounds = BodyLimits(limit, budget if caller.pending else None)
            try:
                length = get_content_length(headers.get("content-length"), headers.get("transfer-encoding"))
                bounds.announced(length)
                data = await _read_body(receive, bounds, timeout, length)
            finally:
                bounds.close()
            raw = parse_json(data)
            if caller.pending:
                checked = await check_key(svc, auth.body_key(raw), peer)
                principal = checked.principal
                if checked.quotas is not None:
                    quotas = checked.quotas
            req, language = exec_request(svc, raw, rs.request_id, principal=principal, profile=profile,
                                         user_header=headers.get("user-id", ""))
            rs.nursery.start_soon(_watch, receive)
            result = await run_here(svc, rs, req, language, lambda stream: _stream(
                send, stream, response_headers(HEARTBEAT_HEADERS, None, quotas, profile)))
            if isinstance(result, Committed):
                committed = result
            else:
                body: Any = answer_of(result, rs)
                status, extra = 200, _NONE
        except ApiError as exc:
            body, status, extra = error_answer(exc, rs)
        except Exception as exc:  # a bug: logged, answered 500 like the app's own handler does
            body, status, extra = unexpected_answer(exc, rs), 500, {}
        if committed is not None:  # from here on an error can only end the stream
            await committed.finish()
            return
        data = dumps(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": response_headers(extra, len(data), quotas, profile)})
        await send({"type": "http.response.body", "body": data})

    return app


async def _stream(send: Any, body: AsyncGenerator[bytes, None], headers: list[tuple[bytes, bytes]]) -> None:
    """A committed ``200``: its head at once, each heartbeat as it comes, then the answer, sent as
    Quart sends an iterable body (every chunk ``more_body``, then an empty last one)."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    async with aclosing(body) as chunks:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
