"""The per-request scope: a nursery the request owns, its access-log record, and two wire fixes.

This thin ASGI layer sits between Hypercorn and the Quart app, and is the one place that knows about
connection-level behaviour:

* **Request-owned work.** Each HTTP request gets a nursery (``RequestScope.nursery``). Work that must
  outlive the handler's ``return`` — the ``/exec`` run behind a heartbeat-streamed body, a download
  streaming out of the file store — is started there, so it is still *owned by the request*: when the
  client disconnects we cancel it, and when the response is complete we cancel whatever is left.
  Nothing outlives its request.
* **Disconnects after the final body chunk are withheld.** Hypercorn does its post-response
  bookkeeping (arming the keep-alive idle timer, closing the socket after ``Connection: close``)
  inside the app's final ``send()``, and may deliver ``http.disconnect`` during that call; Quart-Trio
  reacts by cancelling the request, which cancels Hypercorn's bookkeeping half-way. Observed result:
  idle connections never timed out and ``Connection: close`` did not close the socket. A disconnect
  that arrives once the final chunk is on its way is no longer news to anyone, so we hold it back.
  The final chunk is the one that carries the last byte the client was promised: the ASGI
  ``more_body=False`` message, or, with a ``Content-Length``, the chunk that reaches it (frameworks
  send an empty closing chunk after it, and a client holding all its bytes may leave before that).
* **Outcome ``ok`` vs ``client_gone``.** A response whose last byte was handed to the transport is
  complete (``ok``), even if the client closes at once; ``client_gone`` means the client left before.
* **One access-log line per request**, written in ``finally``: completed, failed, cancelled and
  dropped requests alike, with the outcome and, for a client that left, how long after the start
  (and in which ``/exec`` phase). It is written after the request's nursery has closed, so the
  work's own clean-up has run and what it recorded is final; ``duration_ms`` still ends when the
  app returned. The same finished scope then feeds the metrics (``on_finish``), so logs and
  counters can never disagree.
* **The request id** (the client's ``X-Request-ID`` if it is plain and short, else a new one) is
  echoed in the response and held in a context variable for the request's lifetime: every log line
  written while serving it carries it (``logs.py``), and the exec lifecycle hands it to the sidecar.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from kcr_trio.core.ids import new_id

if TYPE_CHECKING:
    from kcr_trio.core.exec import Phases

access_log = logging.getLogger("kcr_trio.access")
log = logging.getLogger("kcr_trio.api.scope")
# The current request's id, for every other log line written while serving it (see ``logs.py``).
# Trio copies the context into tasks started from the request, so its nurseries inherit it too.
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("kcr_request_id", default=None)


def current_request_id() -> str | None:
    return _REQUEST_ID.get()

# The LibreChat hang-up signature: the client's leaked 5 s idle timer (keepalive.md).
HANGUP_SIGNATURE = (4.9, 5.1)


@dataclass
class RequestScope:
    nursery: trio.Nursery
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    outcome: str | None = None  # set by handlers: ok | timeout | busy | error; client_gone is ours
    response_complete: bool = False
    client_gone_after: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    heartbeat: bool = False
    phases: dict[str, float] | None = None
    exec_phases: Phases | None = None  # the live phases of an /exec request (their ``current``)
    gone_in_phase: str | None = None  # the /exec phase running when the client left
    route: str | None = None  # the matched route template (set by the app; None = no route)
    finished: float | None = None  # seconds from start to the app returning (log duration)
    extra: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def current(scope: Mapping[str, Any]) -> RequestScope:
    """The ``RequestScope`` of an ASGI scope (``request.scope`` in a Quart handler)."""
    rs: RequestScope = scope["kcr"]
    return rs


class RequestScopeMiddleware:
    """Wraps the ASGI app; see the module docstring for what and why."""

    def __init__(self, app: Any, *, on_finish: Any = None,
                 fast_route: Callable[[str, str], Any] | None = None) -> None:
        self.app = app
        self.on_finish = on_finish  # callable(RequestScope, asgi scope) for metrics
        # (method, path) -> a plain ASGI app that answers it instead of ``app``, or None
        # (``api.files_fast.fast_router``: the probes and the file listing).
        self.fast_route = fast_route

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, b"x-request-id") or new_id()
        final_started = False
        rs: RequestScope | None = None
        token = _REQUEST_ID.set(request_id)  # other log lines of this request carry the id
        try:
            async with trio.open_nursery() as nursery:
                rs = RequestScope(nursery=nursery, request_id=request_id)
                scope["kcr"] = rs

                async def wrapped_receive() -> dict[str, Any]:
                    message: dict[str, Any] = await receive()
                    if message["type"] == "http.request":
                        rs.bytes_in += len(message.get("body", b""))
                    elif message["type"] == "http.disconnect":
                        if final_started:
                            # The response is complete; let Hypercorn finish its bookkeeping.
                            await trio.sleep_forever()
                        if rs.client_gone_after is None:
                            rs.client_gone_after = rs.elapsed()
                            if rs.exec_phases is not None:
                                rs.gone_in_phase = rs.exec_phases.current
                        nursery.cancel_scope.cancel()
                    return message

                declared_length: int | None = None

                async def wrapped_send(message: dict[str, Any]) -> None:
                    nonlocal final_started, declared_length
                    if message["type"] == "http.response.start":
                        rs.status = message["status"]
                        message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                        declared_length = _content_length(message["headers"])
                    elif message["type"] == "http.response.body":
                        rs.bytes_out += len(message.get("body", b""))
                        if not message.get("more_body", False):
                            final_started = True
                            await send(message)
                            rs.response_complete = True
                            return
                        if declared_length is not None and rs.bytes_out >= declared_length:
                            # The last byte the client was promised: once it is handed to the
                            # transport the answer is complete, whatever the client does next. A
                            # client that has its Content-Length closes at once (curl does), so
                            # the framework's empty closing chunk may meet a disconnect.
                            final_started = True
                            await send(message)
                            rs.response_complete = True
                            return
                    await send(message)

                app = self.app
                if self.fast_route is not None:
                    app = self.fast_route(scope.get("method", ""), scope.get("path", "")) or app
                try:
                    await app(scope, wrapped_receive, wrapped_send)
                finally:
                    rs.finished = rs.elapsed()
                    # Work the request started must not outlive it.
                    nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside (graceful shutdown ran out, the server stopped) or the app
            # crashed: say so in the line, since no client left and no response completed.
            if rs is not None and not rs.response_complete and rs.client_gone_after is None:
                rs.extra["aborted_by_server"] = True
            raise
        finally:
            # After the nursery: the request's own work has finished its clean-up, so what it
            # recorded (phases) is complete. Runs for every request, whatever ended it.
            _REQUEST_ID.reset(token)
            if rs is not None:
                self._log(scope, rs)

    def _log(self, scope: dict[str, Any], rs: RequestScope) -> None:
        if not rs.response_complete:
            outcome = "client_gone" if rs.client_gone_after is not None else "error"
        else:
            outcome = rs.outcome or ("ok" if (rs.status or 500) < 500 else "error")
        rs.outcome = outcome
        record: dict[str, Any] = {
            "ts": _timestamp(),
            "event": "access",
            "request_id": rs.request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": rs.status,
            "outcome": outcome,
            "duration_ms": round((rs.finished if rs.finished is not None else rs.elapsed()) * 1000, 2),
            "bytes_in": rs.bytes_in,
            "bytes_out": rs.bytes_out,
            "client": (scope.get("client") or ("", 0))[0],
        }
        if rs.client_gone_after is not None:
            record["client_gone_after_s"] = round(rs.client_gone_after, 3)
            lo, hi = HANGUP_SIGNATURE
            record["hangup_signature"] = lo <= rs.client_gone_after <= hi
        if rs.heartbeat:
            record["heartbeat"] = True
        if rs.phases:
            record["phases_ms"] = rs.phases
        if rs.route is not None:
            record["route"] = rs.route
        if rs.gone_in_phase is not None:
            record["gone_in_phase"] = rs.gone_in_phase
        record.update(rs.extra)
        access_log.info(_encode(record))
        if self.on_finish is not None:
            try:
                self.on_finish(rs, scope)
            except Exception:  # metrics must never cost a request its log line or its answer
                log.exception("metrics hook failed")


# The access line's JSON, as ``json.dumps(record, separators=(",", ":"), default=str)`` writes it;
# one encoder built once (``json.dumps`` with arguments builds a new one per call: ~13 µs a line).
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _timestamp() -> str:
    """``%Y-%m-%dT%H:%M:%S.%fZ`` in UTC, as logs.py and the sidecar write it (``isoformat`` with
    fixed microseconds gives the same text at about half of ``strftime``'s cost)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")[:26] + "Z"


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The response's declared ``Content-Length`` (None: none, or not a plain number)."""
    for key, value in headers:
        if key.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1").strip()
            # Only propagate ids that are safe to echo into logs and headers.
            if 0 < len(text) <= 64 and all(c.isalnum() or c in "-_." for c in text):
                return text
    return None
