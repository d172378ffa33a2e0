"""Benchmark targets: ``NAME=URL[,KEY]`` as given by the operator, never a default.

The bench only ever talks to URLs the operator typed. The key may be given inline, as ``env:VAR``
(read from the environment, so it stays out of ``ps`` and shell history) or as ``@PATH`` (first line
of a file). Keys are never written to the report.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,15}$")


class TargetError(ValueError):
    """A ``--target`` value the bench refuses (bad syntax, scheme, or unreadable key)."""


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # scheme://host[:port][/prefix], no trailing slash
    key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key} if self.key else {}

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def is_loopback(self) -> bool:
        """True when the target runs on this machine, so /proc can see its processes."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def public(self) -> dict[str, object]:
        """What the report may record about the target (never the key)."""
        return {"name": self.name, "url": self.url, "key": "set" if self.key else "none", "loopback": self.is_loopback}


def _resolve_key(raw: str) -> str:
    if raw.startswith("env:"):
        value = os.environ.get(raw[4:])
        if not value:
            raise TargetError(f"environment variable {raw[4:]!r} is not set")
        return value.strip()
    if raw.startswith("@"):
        try:
            return Path(raw[1:]).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise TargetError(f"cannot read key file {raw[1:]!r}: {exc}") from exc
    return raw


def parse_target(spec: str) -> Target:
    name, sep, rest = spec.partition("=")
    if not sep or not NAME_RE.match(name):
        raise TargetError(f"--target must look like NAME=URL[,KEY] (NAME: letters, digits, _ or -), got {spec!r}")
    url, _, key = rest.partition(",")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"target {name}: URL must be http:// or https:// with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise TargetError(f"target {name}: URL must not have a query or fragment")
    return Target(name=name, url=url.strip().rstrip("/"), key=_resolve_key(key.strip()) if key.strip() else None)


def parse_targets(specs: list[str]) -> list[Target]:
    if not specs:
        raise TargetError("no --target given: the bench never picks a target by itself (e.g. --target A=http://127.0.0.1:8000,KEY)")
    targets = [parse_target(s) for s in specs]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise TargetError(f"target names must be unique, got {names}")
    if len(targets) > 4:
        raise TargetError("at most 4 targets per run")
    return targets
