"""``/metrics`` after a scripted mix of requests: the counters add up, and agree with the access log."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.ops import H, LogCapture, get_metrics, ops_server, port_of, raw, scrape, total
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration


def exec_bytes(code: str) -> bytes:
    body = json.dumps({"code": code, "lang": "py"}).encode()
    return (
        f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_counters_add_up_after_a_scripted_mix(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(
        tmp_path, capacity=1, kcr_acquire_timeout=0.1, kcr_heartbeat_grace=0.5, kcr_heartbeat_interval=0.5
    ) as (url, program, executor):
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                assert (await client.get(url + "/health")).status_code == 200
            for _ in range(2):
                r = await client.post(url + "/exec", json={"code": "done", "lang": "py"}, headers=H)
                assert r.status_code == 200
            assert (await client.get(url + "/files/abc")).status_code == 401
            assert (await client.get(url + "/files/abc", headers={"X-API-Key": "wrong-key"})).status_code == 401
            sid = "A" * 21
            assert (await client.get(f"{url}/download/{sid}/{sid}", headers=H)).status_code == 404
            assert (await client.get(url + "/no/such/route", headers=H)).status_code == 404
            # Heartbeat: slower than the grace, so the 200 is committed early.
            r = await client.post(url + "/exec", json={"code": "sleep:1.0", "lang": "py"}, headers=H)
            assert r.status_code == 200 and r.text.startswith(" ")

            # Busy: one run holds the only slot; the next gives up after the acquire timeout.
            holder = await raw(port_of(url), exec_bytes("forever"))
            await await_until(lambda: program.running == 1, 5, message="holder running")
            assert (await holder.receive_some()).startswith(b"HTTP/1.1 200")  # its heartbeat began
            r = await client.post(url + "/exec", json={"code": "done", "lang": "py"}, headers=H)
            assert r.status_code == 503 and r.headers["retry-after"]
            # Client gone while executing: the run is cancelled (killed), the slot freed.
            await holder.aclose()
            await await_until(lambda: program.cancelled == 1 and executor.released == 4, 5, message="cancel")
            expected_requests = 12
            await await_until(lambda: len(logs.access()) == expected_requests, 5, message="access lines")

            m = await get_metrics(client, url)
            access = logs.access()

    # Every request once, and the same story as the access log.
    assert total(m, "kcr_http_requests_total") == expected_requests == len(access)
    assert total(m, "kcr_http_requests_total", outcome="ok") == 10
    assert total(m, "kcr_http_requests_total", outcome="busy", status="503", route="/exec") == 1
    assert total(m, "kcr_http_requests_total", outcome="client_gone", route="/exec") == 1
    assert total(m, "kcr_http_requests_total", status="401") == 2
    assert total(m, "kcr_http_requests_total", status="404") == 2
    assert total(m, "kcr_http_requests_total", route="unmatched") == 1
    assert total(m, "kcr_http_requests_total", route="/files/<session_id>") == 2
    assert total(m, "kcr_http_requests_total", route="/exec", status="200", outcome="ok") == 3
    for outcome in ("ok", "busy", "client_gone"):
        assert total(m, "kcr_http_requests_total", outcome=outcome) == sum(1 for a in access if a["outcome"] == outcome)
    assert total(m, "kcr_http_request_duration_seconds_count") == expected_requests
    # Bytes agree with the access log to the byte.
    assert total(m, "kcr_http_request_bytes_total") == sum(a["bytes_in"] for a in access)
    assert total(m, "kcr_http_response_bytes_total") == sum(a["bytes_out"] for a in access)
    # Heartbeats: the slow run and the abandoned one both committed early.
    assert total(m, "kcr_exec_heartbeat_responses_total") == 2 == sum(1 for a in access if a.get("heartbeat"))
    # The disconnect: counted, timed, killed in the execute phase; not LibreChat's 5 s signature.
    assert total(m, "kcr_client_disconnects_total", route="/exec") == 1
    assert total(m, "kcr_client_disconnect_after_seconds_count", route="/exec") == 1
    assert total(m, "kcr_exec_killed_on_cancel_total") == 1
    assert total(m, "kcr_client_hangup_signature_total") == 0
    gone = next(a for a in access if a["outcome"] == "client_gone")
    assert gone["gone_in_phase"] == "execute" and gone["hangup_signature"] is False
    # Phases of the runs the client waited for (two fast, one slow); the busy one never executed.
    assert total(m, "kcr_exec_phase_duration_seconds_count", phase="execute") == 3
    assert total(m, "kcr_exec_phase_duration_seconds_count", phase="acquire") == 3
    assert total(m, "kcr_exec_phase_duration_seconds_count", phase="collect") == 3
    # Pool gauges come from the executor's status() at scrape time.
    assert total(m, "kcr_executor_status_up") == 1
    assert total(m, "kcr_executor_capacity") == 1 and total(m, "kcr_executor_in_use") == 0


async def test_metrics_need_a_key_by_default(tmp_path: Path) -> None:
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url + "/metrics")
            assert r.status_code == 401 and r.json()["error"] == "Missing API key"
            r = await client.get(url + "/metrics", headers={"Authorization": f"Bearer {TEST_KEY}"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert "kcr_http_requests_total" in r.text


async def test_metrics_open_when_configured(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_metrics_auth=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/metrics")).status_code == 200
            assert (await client.get(url + "/files/x")).status_code == 401  # only /metrics opened


async def test_metrics_disabled(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_metrics=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/metrics", headers=H)).status_code == 404
            assert (await client.get(url + "/health")).status_code == 200


async def test_metrics_on_a_separate_port(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    async with ops_server(tmp_path, kcr_metrics_port=metrics_port) as (url, _, _):
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/health")).status_code == 200
            # Not on the API port any more; on its own port, with the key (KCR_METRICS_AUTH).
            assert (await client.get(url + "/metrics", headers=H)).status_code == 404
            assert (await client.get(metrics_url + "/metrics")).status_code == 401
            r = await client.get(metrics_url + "/metrics", headers=H)
            assert r.status_code == 200
            m = scrape(r.text)
            assert total(m, "kcr_http_requests_total", route="/health") == 1
            assert (await client.get(metrics_url + "/exec", headers=H)).status_code == 404


async def test_executor_status_failure_does_not_break_a_scrape(tmp_path: Path) -> None:
    async with ops_server(tmp_path) as (url, _, executor):

        async def broken() -> dict:
            raise RuntimeError("status exploded")

        executor.status = broken  # type: ignore[method-assign]
        async with httpx.AsyncClient(timeout=10) as client:
            m = await get_metrics(client, url)
            assert total(m, "kcr_executor_status_up") == 0
            r = await client.get(url + "/ready")
            assert r.status_code == 503
            assert r.json()["checks"]["executor"] == {
                "ok": False, "error": "unexpected error: RuntimeError", "latency_ms": r.json()["checks"]["executor"]["latency_ms"]
            }
            # Still serving.
            assert (await client.get(url + "/health")).status_code == 200
