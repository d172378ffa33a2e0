"""Rate limits on the wire: per key, per IP after failed authentication, shared across replicas.

The window counters live in the session store (``SessionStore.hit``). The in-process tests use a
store double whose windows never roll over, so a test that happens to straddle a minute boundary
cannot flake; the replica test uses a real redis-server with two servers counting into it.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kcr_trio.backends import memory_sessions
from tests.support.server import TEST_KEY

from tests.support.ops import H, LogCapture, get_metrics, ops_server, total

pytestmark = pytest.mark.integration


class FrozenWindowStore(memory_sessions.MemorySessionStore):
    """Counts like the memory store, in one window that lasts the whole test."""

    async def hit(self, key: str, window_seconds: int) -> int:
        self.frozen = getattr(self, "frozen", {})
        self.frozen[key] = self.frozen.get(key, 0) + 1
        return self.frozen[key]


@pytest.fixture
def frozen_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_sessions, "MemorySessionStore", FrozenWindowStore)


async def test_per_key_limit_answers_429_with_real_headers(tmp_path: Path, frozen_store: None, logs: LogCapture) -> None:
    async with ops_server(tmp_path, kcr_rate_limit_per_minute=3, kcr_metrics_auth=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            remaining = []
            for _ in range(3):
                r = await client.get(url + "/files/x", headers=H)
                assert r.status_code == 200
                remaining.append(r.headers["x-ratelimit-remaining"])
                assert r.headers["x-ratelimit-limit"] == "3" and r.headers["x-ratelimit-period"] == "minute"
            assert remaining == ["2", "1", "0"]
            before = time.time()
            # Over the limit, whichever route and however the key arrives (here: in the JSON body).
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "api_key": TEST_KEY})
            assert r.status_code == 429
            # The body LibreChat's agents 3.9.x classify (contract §1.0.1), and the official server's.
            assert set(r.json()) == {"error", "message", "retry_after_seconds", "timestamp"}
            assert r.json()["error"] == "rate_limited"
            assert r.json()["message"] == "Rate limit exceeded for minute. Limit: 3, Used: 4"
            assert r.json()["retry_after_seconds"] == int(r.headers["retry-after"])
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert r.headers["x-ratelimit-remaining"] == "0" and r.headers["x-ratelimit-limit"] == "3"
            assert before < int(r.headers["x-ratelimit-reset"]) <= before + 61
            # Exempt routes are untouched; the limit shows in the metrics (open here: no key).
            assert (await client.get(url + "/health")).status_code == 200
            m = await get_metrics(client, url)
            assert total(m, "kcr_rate_limited_total", limit="minute") == 1
            assert total(m, "kcr_http_requests_total", status="429", outcome="ok") == 1
    limited = [a for a in logs.access() if a["status"] == 429]
    assert [a.get("rate_limited") for a in limited] == ["minute"]


async def test_wrong_keys_from_one_ip_are_blocked(tmp_path: Path, frozen_store: None) -> None:
    async with ops_server(tmp_path, kcr_auth_failures_per_minute=3, kcr_metrics_auth=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            # Missing keys are not guesses: they never count.
            for _ in range(5):
                assert (await client.get(url + "/files/x")).status_code == 401
            assert (await client.get(url + "/files/x", headers=H)).status_code == 200
            for _ in range(3):
                r = await client.get(url + "/files/x", headers={"X-API-Key": "guess"})
                assert r.status_code == 401
            # Blocked: further wrong keys from this address get 429 until the window ends...
            r = await client.get(url + "/files/x", headers={"X-API-Key": "guess"})
            assert r.status_code == 429
            assert r.json()["error"] == "rate_limited"
            assert r.json()["message"] == "Too many failed authentication attempts; try again later"
            assert r.json()["retry_after_seconds"] == int(r.headers["retry-after"]) >= 1
            assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining"] == "0"
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "api_key": "guess"})
            assert r.status_code == 429
            # ...but the right key is never locked out (behind an ingress everyone shares one IP).
            assert (await client.get(url + "/files/x", headers=H)).status_code == 200
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "api_key": TEST_KEY})
            assert r.status_code == 200
            # Unauthenticated routes keep working.
            assert (await client.get(url + "/health")).status_code == 200
            assert (await client.get(url + "/ready")).status_code == 200
            m = await get_metrics(client, url)
            assert total(m, "kcr_rate_limited_total", limit="auth_failures") == 2


async def test_limits_off(tmp_path: Path, frozen_store: None) -> None:
    async with ops_server(tmp_path, rate_limit_enabled=False, kcr_rate_limit_per_minute=1,
                          kcr_auth_failures_per_minute=1) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                assert (await client.get(url + "/files/x", headers={"X-API-Key": "guess"})).status_code == 401
            for _ in range(3):
                r = await client.get(url + "/files/x", headers=H)
                assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers


async def test_limits_hold_across_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers, one redis-server: the per-key count is shared."""
    trio_asyncio = pytest.importorskip("trio_asyncio")
    from tests.support.redis_server import running_redis

    with running_redis() as redis:
        for name, value in redis.env(prefix="rl:").items():
            monkeypatch.setenv(name, value)
        async with trio_asyncio.open_loop():
            async with ops_server(tmp_path / "a", kcr_session_store="redis", kcr_rate_limit_per_hour=4,
                                  kcr_metrics_auth=False) as (a, _, _):
                async with ops_server(tmp_path / "b", kcr_session_store="redis", kcr_rate_limit_per_hour=4,
                                      kcr_metrics_auth=False) as (b, _, _):
                    async with httpx.AsyncClient(timeout=10) as client:
                        statuses = []
                        for url in (a, b, a, b, a, b):
                            statuses.append((await client.get(url + "/files/x", headers=H)).status_code)
                        m = await get_metrics(client, b)
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert total(m, "kcr_rate_limited_total", limit="hour") == 1
