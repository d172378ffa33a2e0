"""Read a target's Prometheus ``/metrics`` if it has one, and diff two scrapes.

Servers differ in what they export (KubeCodeRun's ``/metrics`` is JSON, a kcr-trio build may export
Prometheus text), so the bench does not depend on metric names: it records every numeric series that
changed during a scenario and lifts those whose names mention cancellation, disconnects, hang-ups or
busy-time into the report. A missing or non-Prometheus endpoint simply yields ``None``.
"""

from __future__ import annotations

import re

import httpx

LINE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEnNaIif]+)(?:\s+\d+)?$")
INTERESTING = ("client_gone", "disconnect", "hangup", "hang_up", "cancel", "killed", "wasted", "busy", "abort")


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        if not m:
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            continue
    return out


async def scrape(c: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        r = await c.get("/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200 or "json" in r.headers.get("content-type", ""):
        return None
    parsed = parse_prometheus(r.text)
    return parsed or None


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def interesting(d: dict[str, float] | None) -> dict[str, float]:
    if not d:
        return {}
    return {k: v for k, v in d.items()
            if "_bucket" not in k and any(word in k.lower() for word in INTERESTING)}
