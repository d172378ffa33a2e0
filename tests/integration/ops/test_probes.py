"""``GET``/``HEAD`` of ``/health`` and ``/ready`` are answered below Quart (``api/probes.py``): the
same answer as any app route gives (JSON, security and profile headers, request id), and the same
accounting (one access line with the route, the metrics)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.ops import H, LogCapture, get_metrics, ops_server, total

pytestmark = pytest.mark.integration

APP_HEADERS = {"content-type", "content-length", "x-content-type-options", "x-frame-options",
               "referrer-policy", "x-codeapi-execution-profile", "x-request-id", "date"}


async def test_probe_answers_carry_what_app_answers_carry(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path) as (url, _, _), httpx.AsyncClient(timeout=10) as client:
        app_answer = await client.get(url + "/files/abcdefghijklmnopqrstu", headers=H)  # through Quart
        assert app_answer.status_code == 200 and set(app_answer.headers) - {"connection"} == APP_HEADERS
        for path in ("/health", "/ready"):
            r = await client.get(url + path, headers={"X-Request-ID": f"probe{path[1:]}"})
            assert r.status_code == 200 and set(r.headers) == APP_HEADERS, r.headers
            assert r.headers["x-request-id"] == f"probe{path[1:]}"
            assert r.headers["x-codeapi-execution-profile"] == app_answer.headers["x-codeapi-execution-profile"]
            head = await client.head(url + path)
            assert head.status_code == 200 and head.content == b"" and set(head.headers) == APP_HEADERS
        assert (await client.head(url + "/health")).headers["content-length"] == str(len(
            (await client.get(url + "/health")).content))
        health = (await client.get(url + "/health")).json()
        assert health["status"] == "healthy" and set(health["config"]) == {"debug", "docs_enabled", "cors_enabled"}
        ready = (await client.get(url + "/ready")).json()
        assert ready["status"] == "ready" and {"sessions", "files", "executor"} <= set(ready["checks"])
        # Other methods still reach the app: 405 with Allow, in the project's error shape.
        r = await client.post(url + "/health", headers=H)
        assert r.status_code == 405 and "GET" in r.headers["allow"] and r.json()["error"]
        m = await get_metrics(client, url)
        assert total(m, "kcr_http_requests_total", route="/health", method="GET", outcome="ok") == 3
        assert total(m, "kcr_http_requests_total", route="/ready", method="GET", outcome="ok") == 2
    lines = {a["request_id"]: a for a in logs.access()}
    for path in ("/health", "/ready"):
        line = lines[f"probe{path[1:]}"]
        assert (line["path"], line["route"], line["status"], line["outcome"]) == (path, path, 200, "ok")
        assert line["bytes_out"] > 0
