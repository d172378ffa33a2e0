"""Prometheus metrics, fed from the one place that sees every request.

``Metrics.on_finish`` is the ``RequestScopeMiddleware`` hook: it runs once per request, after the
access-log line, with the finished ``RequestScope`` — so the counters and the access log can never
disagree about how many requests there were or how they ended. Handlers do not touch metrics; they
only record facts on the scope (route, outcome, phases, heartbeat, rate-limit decisions).

Per-request cost is a handful of dictionary lookups and lock-protected additions (a few
microseconds, against ~700 µs for a trivial request on Quart-Trio). Label values are bounded: routes
are the url_map's templates (``/files/<session_id>``), never raw paths; unmatched paths share one
label, and so do HTTP methods outside the standard set (``other``).

Pool gauges are not pushed: the executor's ``status()`` is read at scrape time (bounded by a short
timeout) and rendered by a custom collector, so they are always current and cost nothing between
scrapes. Every numeric field an executor reports is exported, top level as ``kcr_executor_<field>``
and per language under ``pools`` as ``kcr_pool_<field>{language=...}``.

A registry per server (not the global default), so several servers in one process — the test suite —
do not share counters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scope import HANGUP_SIGNATURE, RequestScope

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"
EXEC_ROUTE = "/exec"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Edges at 4.9 and 5.1 s isolate LibreChat's leaked 5 s idle timer (keepalive.md).
DISCONNECT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 4.9, 5.1, 6.0, 10.0, 30.0, 60.0, 120.0)
_FIELD = re.compile(r"[^a-z0-9_]")
# The ``*_created`` series double the exposition and nobody graphs them.
prometheus_client.disable_created_metrics()


# The methods counted under their own name; everything else is "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kcr_http_requests", "HTTP requests by route template, method, status and outcome",
            ["route", "method", "status", "outcome"], registry=r,
        )
        self.latency = Histogram(
            "kcr_http_request_duration_seconds", "Time from request start to the handler's answer, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.phases = Histogram(
            "kcr_exec_phase_duration_seconds",
            "Duration of each /exec phase (store, acquire, upload, execute, collect) of requests the "
            "client waited for",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.heartbeats = Counter(
            "kcr_exec_heartbeat_responses", "/exec responses committed early and kept alive with spaces",
            registry=r,
        )
        self.disconnects = Counter(
            "kcr_client_disconnects", "Requests whose client left before the response was complete",
            ["route"], registry=r,
        )
        self.disconnect_after = Histogram(
            "kcr_client_disconnect_after_seconds", "How long after the request started the client left",
            ["route"], buckets=DISCONNECT_BUCKETS, registry=r,
        )
        self.hangups = Counter(
            "kcr_client_hangup_signature",
            "Client disconnects 5.0 ± 0.1 s after the start: LibreChat's leaked idle timer",
            registry=r,
        )
        self.killed = Counter(
            "kcr_exec_killed_on_cancel", "Runs cancelled (process tree killed) because the client left",
            registry=r,
        )
        self.bytes_in = Counter("kcr_http_request_bytes", "Request body bytes received", ["route"], registry=r)
        self.bytes_out = Counter("kcr_http_response_bytes", "Response body bytes sent", ["route"], registry=r)
        self.rate_limited = Counter(
            "kcr_rate_limited", "Requests answered 429, by limit (minute, hour, auth_failures)",
            ["limit"], registry=r,
        )
        self._pools: dict[str, Any] | None = None
        # (metric, label values) -> its child. ``labels()`` validates and takes a lock on every
        # call (~10 per /exec request); the label values are bounded (see above), so are these.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r.register(_PoolCollector(self))

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- per request ---------------------------------------------------------------------------

    def on_finish(self, rs: RequestScope, scope: dict[str, Any]) -> None:
        route = rs.route or UNMATCHED
        outcome = rs.outcome or "error"
        status = str(rs.status) if rs.status is not None else "none"
        method = scope.get("method", "")
        # Any token is a valid HTTP method: an unknown one must not mint a new series (finding 10).
        self._child(self.requests, route, method if method in KNOWN_METHODS else "other", status, outcome).inc()
        finished = rs.finished if rs.finished is not None else rs.elapsed()
        self._child(self.latency, route).observe(finished)
        if rs.bytes_in:
            self._child(self.bytes_in, route).inc(rs.bytes_in)
        if rs.bytes_out:
            self._child(self.bytes_out, route).inc(rs.bytes_out)
        if rs.heartbeat:
            self.heartbeats.inc()
        limited = rs.extra.get("rate_limited")
        if limited:
            self._child(self.rate_limited, limited).inc()
        if rs.client_gone_after is not None and outcome == "client_gone":
            self._child(self.disconnects, route).inc()
            self._child(self.disconnect_after, route).observe(rs.client_gone_after)
            lo, hi = HANGUP_SIGNATURE
            if lo <= rs.client_gone_after <= hi:
                self.hangups.inc()
            if rs.gone_in_phase == "execute":
                self.killed.inc()
        elif rs.phases and route == EXEC_ROUTE:
            # Phases of abandoned runs are cut short; they would only blur the histogram.
            for phase, ms in list(rs.phases.items()):
                self._child(self.phases, phase).observe(ms / 1000.0)

    # -- per scrape ----------------------------------------------------------------------------

    def render(self, executor_status: dict[str, Any] | None) -> bytes:
        """The exposition text; ``executor_status`` is what the executor's ``status()`` said now."""
        self._pools = executor_status
        try:
            return generate_latest(self.registry)
        finally:
            self._pools = None


class _PoolCollector:
    """Gauges from the executor's status snapshot taken for this scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # dynamic: fields depend on the executor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.metrics._pools
        up = GaugeMetricFamily("kcr_executor_status_up", "1 if the executor answered status() for this scrape")
        up.add_metric([], 0.0 if status is None else 1.0)
        yield up
        if status is None:
            return
        for key, value in status.items():
            number = _number(value)
            if number is not None:
                name = "kcr_executor_" + _FIELD.sub("_", key.lower())
                family = GaugeMetricFamily(name, f"executor status field {key!r}")
                family.add_metric([], number)
                yield family
        pools = status.get("pools")
        if isinstance(pools, dict):
            families: dict[str, GaugeMetricFamily] = {}
            for language, fields in sorted(pools.items()):
                if not isinstance(fields, dict):
                    continue
                for key, value in fields.items():
                    number = _number(value)
                    if number is None:
                        continue
                    name = "kcr_pool_" + _FIELD.sub("_", key.lower())
                    if name not in families:
                        families[name] = GaugeMetricFamily(name, f"pool status field {key!r}", labels=["language"])
                    families[name].add_metric([str(language)], number)
            yield from families.values()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None
