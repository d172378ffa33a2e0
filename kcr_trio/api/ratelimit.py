"""Per-key request limits and per-IP auth-failure limits, shared by every replica.

KubeCodeRun 2.1.3 declares both and enforces neither (``kubecoderun-internals.md`` §4.4); kcr-trio
makes them real. Counting goes through ``SessionStore.hit(key, window)``: a fixed window aligned to
the epoch, kept in Redis when the Redis store is configured, so all replicas count together.

* **Per key** (``KCR_RATE_LIMIT_PER_MINUTE``, ``KCR_RATE_LIMIT_PER_HOUR``; 0 = unlimited): every
  authenticated request counts once per configured window. Over the limit → 429. Keys are counted
  under a hash, never stored or logged in clear.
* **Per client IP, failed authentication** (``KCR_AUTH_FAILURES_PER_MINUTE``): a request presenting a
  *wrong* key counts; a request with *no* key does not (agents 3.1.70–3.1.79 call some routes with
  no key at all, and locking out the LibreChat server for that would be worse than the disease).
  Once an IP reaches the limit, every request from it that fails authentication is answered 429
  instead of 401 until the window ends. A *valid* key is never refused: behind an ingress all
  clients share the proxy's address, and 60 wrong keys from anyone must not lock LibreChat out
  (audit finding 5). Guessing a 256-bit key is hopeless anyway; the limit throttles the noise. The block
  is remembered locally until the window ends, so blocked requests cost no store round trip; other
  replicas learn it from the shared counter at the next failure they see (so at most one extra
  attempt per replica). The IP is the socket peer, as in KubeCodeRun: behind a proxy it is the
  proxy's; trusted networks (``AUTH_TRUSTED_NETWORKS``) skip authentication and these limits.

Both answer before anything is committed, in KubeCodeRun's middleware shape A, *with* the
``Retry-After`` and ``X-RateLimit-*`` headers KubeCodeRun builds and then drops.

**Failing open.** A counter that cannot be reached within ``STORE_TIMEOUT`` (store down or stuck)
does not turn every request into an error — ``/metrics`` and the routes that still work must keep
working while Redis is away. The request is let through uncounted and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kcr_trio.core.interfaces import SessionStore

from .errors import CodedError

WINDOWS = {"minute": 60, "hour": 3600}
STORE_TIMEOUT = 1.0  # seconds one counter update may take before we let the request through
log = logging.getLogger("kcr_trio.ratelimit")


class RateLimited(CodedError):
    """429 ``{"error": "rate_limited", "message", "retry_after_seconds"}`` beside ``Retry-After``.

    The body is what LibreChat's agents 3.9.x read (they ignore the header; contract §1.0.1) and
    what the official server sends; the model is then told how long to wait.
    """

    def __init__(self, message: str, *, limit: str, headers: dict[str, str]) -> None:
        retry = int(headers.get("Retry-After", "1"))
        super().__init__("rate_limited", message, status=429, headers=headers, retry_after_seconds=retry)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Quota:
    """The state of one window after counting this request (for the ``X-RateLimit-*`` headers)."""

    period: str
    limit: int
    used: int
    reset: float  # epoch seconds when the window ends

    def headers(self, now: float) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": str(int(self.reset)),
            "X-RateLimit-Period": self.period,
        }


def _window_end(now: float, seconds: int) -> float:
    return (math.floor(now / seconds) + 1) * seconds


def retry_after(now: float, reset: float) -> str:
    return str(max(1, math.ceil(reset - now)))


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class RateLimiter:
    def __init__(
        self,
        store: SessionStore,
        *,
        per_minute: int = 0,
        per_hour: int = 0,
        auth_failures_per_minute: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = [(p, n) for p, n in (("minute", per_minute), ("hour", per_hour)) if n > 0]
        self.auth_failures = auth_failures_per_minute
        self.clock = clock
        self._blocked: dict[str, float] = {}  # ip -> epoch when the block ends

    @property
    def active(self) -> bool:
        return bool(self.limits) or self.auth_failures > 0

    def check_blocked(self, ip: str | None) -> None:
        """429 if this IP has used up its auth failures (local, no I/O: call on every request)."""
        if not self.auth_failures or not ip or not self._blocked:
            return
        until = self._blocked.get(ip)
        if until is None:
            return
        now = self.clock()
        if now >= until:
            self._blocked.pop(ip, None)
            return
        raise self._auth_limited(now, until, self.auth_failures)

    async def auth_failed(self, ip: str | None) -> None:
        """Count a wrong key from ``ip``; remember the block once the limit is reached."""
        if not self.auth_failures or not ip:
            return
        count = await self._hit(f"authfail:{ip}", 60)
        if count is not None and count >= self.auth_failures:
            now = self.clock()
            self._blocked[ip] = _window_end(now, 60)
            if len(self._blocked) > 10_000:  # bound memory under a spray of addresses
                self._blocked = {k: v for k, v in self._blocked.items() if v > now}

    async def check_key(self, key: str) -> list[Quota]:
        """Count one request for ``key`` in each configured window; 429 if any is over."""
        if not self.limits:
            return []
        ident = key_id(key)
        quotas = []
        for period, limit in self.limits:
            seconds = WINDOWS[period]
            used = await self._hit(f"key:{ident}:{period}", seconds)
            if used is None:
                continue
            now = self.clock()
            quota = Quota(period, limit, used, _window_end(now, seconds))
            if used > limit:
                headers = {**quota.headers(now), "Retry-After": retry_after(now, quota.reset)}
                raise RateLimited(
                    f"Rate limit exceeded for {period}. Limit: {limit}, Used: {used}", limit=period, headers=headers
                )
            quotas.append(quota)
        return quotas

    async def _hit(self, key: str, window: int) -> int | None:
        """The store's count, or ``None`` if the store failed or took too long (fail open)."""
        with trio.move_on_after(STORE_TIMEOUT):
            try:
                return await self.store.hit(key, window)
            except Exception as exc:  # Unavailable, or a backend bug: never the client's problem
                log.warning("rate-limit counter unavailable; request not counted: %s", type(exc).__name__)
                return None
        log.warning("rate-limit counter took longer than %s s; request not counted", STORE_TIMEOUT)
        return None

    def _auth_limited(self, now: float, until: float, limit: int) -> RateLimited:
        headers = {
            "Retry-After": retry_after(now, until),
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(until)),
            "X-RateLimit-Period": "minute",
        }
        return RateLimited(
            "Too many failed authentication attempts; try again later", limit="auth_failures", headers=headers
        )
