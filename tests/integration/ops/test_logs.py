"""Access logs: exactly one line per request, whatever ended it; request ids everywhere; no secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from kcr_trio.backends import memory_sessions
from tests.support.ops import H, LogCapture, ops_server, port_of, raw, read_all
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def lines_for(logs: LogCapture, request_id: str) -> list[dict]:
    return [a for a in logs.access() if a["request_id"] == request_id]


async def test_exactly_one_access_line_per_request(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path, kcr_max_json_body_bytes=2048, max_file_size_mb=1, kcr_heartbeat_grace=0.2) as (
        url, program, _,
    ):
        port = port_of(url)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url + "/health", headers={"X-Request-ID": "t-ok"})
            assert r.headers["x-request-id"] == "t-ok"
            assert (await client.get(url + "/files/x", headers={"X-Request-ID": "t-401"})).status_code == 401
            r = await client.post(
                url + "/exec", headers={**H, "X-Request-ID": "t-413"}, json={"code": "x" * 4096, "lang": "py"}
            )
            assert r.status_code == 413
            files = {"file": ("big.bin", b"\0" * (1024 * 1024 + 1), "application/octet-stream")}
            r = await client.post(url + "/upload", headers={**H, "X-Request-ID": "t-413-upload"}, files=files)
            assert r.status_code == 413

        # Dropped mid-body: the headers promise 1000 bytes, 10 arrive, then the client leaves.
        stream = await raw(
            port,
            f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nX-Request-ID: t-dropped\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"code": "',
        )
        await stream.aclose()
        await await_until(lambda: lines_for(logs, "t-dropped"), 5, message="dropped request's line")

        # Cancelled while running (after the heartbeat committed a 200).
        body = json.dumps({"code": "forever", "lang": "py"}).encode()
        stream = await raw(
            port,
            f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nX-Request-ID: t-cancelled\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
        )
        await await_until(lambda: program.running == 1, 5, message="run started")
        first = await stream.receive_some()
        assert first.startswith(b"HTTP/1.1 200")
        await stream.aclose()
        await await_until(lambda: lines_for(logs, "t-cancelled"), 5, message="cancelled request's line")

        # A request after all that, so any late duplicate would have been written by now.
        stream = await raw(port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: t-last\r\nConnection: close\r\n\r\n")
        assert (await read_all(stream)).startswith(b"HTTP/1.1 200")
        await await_until(lambda: lines_for(logs, "t-last"), 5, message="last line")

    by_id = {rid: lines_for(logs, rid) for rid in ("t-ok", "t-401", "t-413", "t-413-upload", "t-dropped", "t-cancelled")}
    assert {rid: len(lines) for rid, lines in by_id.items()} == dict.fromkeys(by_id, 1)
    assert by_id["t-ok"][0]["status"] == 200 and by_id["t-ok"][0]["outcome"] == "ok"
    assert by_id["t-401"][0]["status"] == 401
    assert by_id["t-413"][0]["status"] == 413 and by_id["t-413-upload"][0]["status"] == 413
    dropped = by_id["t-dropped"][0]
    assert dropped["outcome"] == "client_gone" and dropped["status"] is None and dropped["bytes_in"] == 10
    cancelled = by_id["t-cancelled"][0]
    assert cancelled["outcome"] == "client_gone" and cancelled["status"] == 200 and cancelled["heartbeat"] is True
    assert cancelled["gone_in_phase"] == "execute" and cancelled["client_gone_after_s"] > 0.2
    assert program.running == 0 and program.cancelled == 1  # the dropped body never ran
    for line in logs.access():
        assert {"request_id", "method", "path", "route", "status", "outcome", "duration_ms"} <= set(line)
        assert ISO_UTC.fullmatch(line["ts"]), line["ts"]  # the same ts format as every other line


async def test_no_secrets_or_contents_in_logs(tmp_path: Path, logs: LogCapture) -> None:
    wrong_key = "wrong-guess-Zq8xKp2mW9"
    file_marker = "FILE-CONTENT-5f1d0c9e7b"
    code_marker = "CODE-MARKER-a83be17c42"
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/upload", headers=H, files={"file": ("data.csv", file_marker.encode(), "text/csv")})
            assert r.status_code == 200
            sid, fid = r.json()["session_id"], r.json()["files"][0]["fileId"]
            ref = {"id": fid, "session_id": sid, "name": "data.csv"}
            missing = {"id": "B" * 21, "session_id": sid, "name": "gone.csv"}  # logs a warning
            r = await client.post(url + "/exec", headers={"Authorization": f"Bearer {TEST_KEY}"},
                                  json={"code": f"write:{code_marker}", "lang": "py", "files": [ref, missing]})
            assert r.status_code == 200
            # Key in the body only (agents 3.1.70–3.1.79).
            r = await client.post(url + "/exec", json={"code": code_marker, "lang": "py", "LIBRECHAT_CODE_API_KEY": TEST_KEY})
            assert r.status_code == 200
            for headers in ({"X-API-Key": wrong_key}, {"Authorization": f"ApiKey {wrong_key}"}):
                assert (await client.get(f"{url}/files/{sid}", headers=headers)).status_code == 401
            r = await client.post(url + "/exec", json={"code": code_marker, "lang": "py", "api_key": wrong_key})
            assert r.status_code == 401
            r = await client.get(f"{url}/download/{sid}/{fid}", headers=H)
            assert r.status_code == 200 and r.content == file_marker.encode()
            await await_until(lambda: len(logs.access()) == 7, 5, message="access lines")
    text = logs.text()
    assert "file ref not found" in text  # the warning path ran and was captured
    for secret in (TEST_KEY, wrong_key, file_marker, code_marker):
        assert secret not in text, f"{secret!r} leaked into the logs"


async def test_request_id_reaches_every_log_line_of_the_request(
    tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    class TalkativeStore(memory_sessions.MemorySessionStore):
        async def list_files(self, session_id: str):  # type: ignore[no-untyped-def]
            logging.getLogger("tests.store").info("listing files")  # no request id passed in
            return await super().list_files(session_id)

    monkeypatch.setattr(memory_sessions, "MemorySessionStore", TalkativeStore)
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url + "/files/" + "C" * 21, headers={**H, "X-Request-ID": "rid-from-client"})
            assert r.status_code == 200
            r = await client.get(url + "/files/" + "C" * 21, headers=H)
            generated = r.headers["x-request-id"]
            await await_until(lambda: len(logs.access()) == 2, 5)
    store_lines = [line for line in logs.lines() if line.get("event") == "listing files"]
    assert [line["request_id"] for line in store_lines] == ["rid-from-client", generated]
    assert len(generated) == 21


async def test_requests_cut_by_shutdown_still_get_their_line(tmp_path: Path, logs: LogCapture) -> None:
    """SIGTERM drain: a run still going when graceful_timeout ends is cancelled, and logged."""
    async with ops_server(tmp_path, kcr_graceful_timeout=0.5, kcr_heartbeat_grace=5.0) as (url, program, executor):
        body = json.dumps({"code": "forever", "lang": "py"}).encode()
        stream = await raw(
            port_of(url),
            f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nX-Request-ID: t-shutdown\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
        )
        await await_until(lambda: program.running == 1, 5, message="run started")
    # Leaving the block shut the server down; the run was cancelled and its sandbox released.
    assert program.cancelled == 1 and executor.released == 1
    [line] = lines_for(logs, "t-shutdown")
    assert line["outcome"] == "error" and line["status"] is None and line["aborted_by_server"] is True
    await stream.aclose()
