"""``GET /files/{sid}`` is answered below Quart (``api/files_fast.py``): every answer must be the one
the Quart route gives. One server on a real redis-server; each question is asked twice, with the
fast path on and with it switched off (``files_fast.is_listing`` is looked up per request), and the
two answers are compared: status, headers, body, access line and metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kcr_trio.api import files_fast
from tests.support.ops import H, LogCapture, get_metrics, ops_server, total
from tests.support.redis_server import RedisServer
from tests.support.server import TEST_KEY

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key-0123456789abcdef"
UPLOAD_KEY = "upload-key-0123456789abcdef"
VOLATILE_HEADERS = {"date", "x-request-id", "connection"}
VOLATILE_FIELDS = {"timestamp", "request_id", "lastModified"}


@pytest.fixture
def own_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    for name, value in server.env(prefix="ff:").items():
        monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.close()


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        if isinstance(value.get("retry_after_seconds"), int):  # seconds to the window's end
            value["retry_after_seconds"] = "<n>"
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def answer(r: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in r.headers.items() if k not in VOLATILE_HEADERS}
    assert headers.pop("content-length") == str(len(r.content))  # bodies with a timestamp vary in length
    for name in ("x-ratelimit-reset", "retry-after"):  # seconds to a window's end: present, a number
        if name in headers:
            assert re.fullmatch(r"\d+", headers[name]), headers
            headers[name] = "<n>"
    return r.status_code, headers, _strip(json.loads(r.content)) if r.content else None


async def both(client: httpx.AsyncClient, url: str, monkeypatch: pytest.MonkeyPatch, fast_key: str = TEST_KEY,
               quart_key: str = TEST_KEY, **kw: Any) -> tuple[Any, Any]:
    """The same request through the fast path and through Quart (each with its own key, so that
    per-key counters give both paths the same sequence)."""
    headers = dict(kw.pop("headers", {}))
    fast = await client.get(url, headers={**headers, "X-API-Key": fast_key} if fast_key else headers, **kw)
    with monkeypatch.context() as m:
        m.setattr(files_fast, "is_listing", lambda method, path: False)
        slow = await client.get(url, headers={**headers, "X-API-Key": quart_key} if quart_key else headers, **kw)
    return answer(fast), answer(slow)


async def test_fast_listing_answers_as_quart_does(tmp_path: Path, own_redis: RedisServer, logs: LogCapture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with ops_server(tmp_path, kcr_session_store="redis", api_keys=f"{OTHER_KEY},{UPLOAD_KEY}", kcr_rate_limit_per_minute=4,
                          kcr_auth_failures_per_minute=3) as (url, _, _), \
            httpx.AsyncClient(timeout=10) as client:
        up = await client.post(url + "/upload", headers={"X-API-Key": UPLOAD_KEY}, files={"file": ("a b.csv", b"1,2\n")})
        sid = up.json()["session_id"]
        base = f"{url}/files/{sid}"
        # Per-key quotas: four requests per minute per key, each path with its own key.
        for query in ("?detail=summary", "?detail=simple", "", "?detail=summar%79&detail=full"):
            fast, slow = await both(client, base + query, monkeypatch, quart_key=OTHER_KEY)
            assert fast == slow and fast[0] == 200 and fast[1]["x-ratelimit-limit"] == "4", (query, fast, slow)
        assert fast[2] == [{"name": f"{sid}/{up.json()['files'][0]['fileId']}"}]  # the summary shape
        fast, slow = await both(client, base, monkeypatch, quart_key=OTHER_KEY)  # the fifth: 429
        assert fast == slow and fast[0] == 429 and fast[2]["error"] == "rate_limited", fast

    async with ops_server(tmp_path, kcr_session_store="redis", kcr_auth_failures_per_minute=4) as (url, _, _), \
            httpx.AsyncClient(timeout=10) as client:
        base = f"{url}/files/abcdefghijklmnopqrstu"
        for kw in ({}, {"params": {"detail": "summary"}}, {"headers": {"Authorization": f"Bearer {TEST_KEY}"}}):
            fast, slow = await both(client, base, monkeypatch, **kw)
            assert fast == slow and fast[0] == 200 and fast[2] == [], (kw, fast)
        fast, slow = await both(client, f"{url}/files/not*safe", monkeypatch)
        assert fast == slow and fast[0] == 200 and fast[2] == []
        fast, slow = await both(client, base, monkeypatch, fast_key="", quart_key="")
        assert fast == slow and fast[0] == 401 and fast[2]["error"] == "Missing API key", fast
        fast, slow = await both(client, base, monkeypatch, fast_key="wrong", quart_key="wrong")  # failures 1, 2
        assert fast == slow and fast[0] == 401 and fast[2]["error"] == "Invalid API key", fast
        # Failures from both paths count for the address: blocked after four (a counter that was
        # not updated in time lets a request through, so count pairs until both are refused).
        pairs = 0
        while True:
            pairs += 1
            fast, slow = await both(client, base, monkeypatch, fast_key="wrong", quart_key="wrong")
            if fast[0] == slow[0] == 429:
                break
            assert {fast[0], slow[0]} <= {401, 429} and pairs < 8, (fast, slow)
        assert fast == slow and fast[0] == 429 and "retry-after" in fast[1], fast
        fast, slow = await both(client, base, monkeypatch)  # a valid key always passes
        assert fast == slow and fast[0] == 200

        await trio.to_thread.run_sync(own_redis.stop)
        fast, slow = await both(client, base, monkeypatch)
        assert fast == slow and fast[0] == 503, fast
        assert fast[2]["error"] == "Session store unavailable: cannot connect to Redis" and "retry-after" in fast[1]
        m = await get_metrics(client, url)
        assert total(m, "kcr_http_requests_total", route="/files/<session_id>", method="GET", status="503",
                     outcome="error") == 2

    lines = [a for a in logs.access() if a["path"].startswith("/files/") and a["method"] == "GET"]
    assert len(lines) == 2 * (5 + 8 + pairs)
    for fast_line, slow_line in zip(lines[::2], lines[1::2], strict=True):
        if (fast_line["status"], slow_line["status"]) == (401, 429):  # the pair the block began in
            continue
        keys = ("path", "route", "status", "outcome", "rate_limited")
        assert {k: fast_line.get(k) for k in keys} == {k: slow_line.get(k) for k in keys}, (fast_line, slow_line)
        if fast_line["status"] == 200:  # error bodies carry a timestamp of varying length
            assert fast_line["bytes_out"] == slow_line["bytes_out"]


async def test_fast_listing_keeps_the_handler_deadline(tmp_path: Path, own_redis: RedisServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that does not answer costs the client the handler deadline and a 504, on both paths."""
    async with ops_server(tmp_path, kcr_session_store="redis", kcr_request_timeout=0.3,
                          kcr_auth_failures_per_minute=0) as (url, _, _), httpx.AsyncClient(timeout=10) as client:
        base = f"{url}/files/abcdefghijklmnopqrstu"
        assert (await client.get(base, headers=H)).status_code == 200  # connections are open
        results = []
        for fast in (True, False):
            # Redis holds every command for 1.5 s (the pause is in force once it said OK).
            assert own_redis.command("CLIENT", "PAUSE", "1500", "ALL") == b"+OK"
            with monkeypatch.context() as m:
                if not fast:
                    m.setattr(files_fast, "is_listing", lambda method, path: False)
                results.append(answer(await client.get(base, headers=H)))
            # Until Redis answers again (the pause ended), the next question would not be fair.
            assert await trio.to_thread.run_sync(lambda: own_redis.command("PING", timeout=10)) == b"+PONG"
        assert results[0] == results[1] and results[0][0] == 504, results
        assert results[0][2]["error"] == "Request timed out"
