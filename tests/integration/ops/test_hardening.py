"""Bad input and faults at the HTTP edge: a clear 4xx or a clean result, never a 500, never a crash.

In-process server, in-process executor: these are about what the edge does with hostile requests
and slow dependencies. Every test ends by checking the server still serves and that no request was
answered 5xx unless the test meant it (the access log says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kcr_trio.backends import memory_sessions
from tests.support.ops import H, LogCapture, get_metrics, ops_server, port_of, raw, read_all, total
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration


async def still_serving(client: httpx.AsyncClient, url: str) -> None:
    assert (await client.get(url + "/health")).status_code == 200
    r = await client.post(url + "/exec", headers=H, json={"code": "ok", "lang": "py"})
    assert r.status_code == 200 and r.json()["stdout"] == "done\n"


def no_server_errors(logs: LogCapture, allowed: int = 0) -> None:
    errors = [a for a in logs.access() if (a["status"] or 0) >= 500]
    assert len(errors) == allowed, errors


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_traversal_in_filenames_and_ids(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path / "data") as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            names = ["../../etc/passwd", "..\\..\\boot.ini", "/abs/path.txt", "..", ".hidden", "a/../../b.txt", "x\0y.txt"]
            stored = []
            for name in names:
                body, ctype = multipart([("file", name, b"content")])
                r = await client.post(url + "/upload", headers={**H, "Content-Type": ctype}, content=body)
                assert r.status_code == 200, r.text
                stored.append(r.json()["files"][0]["filename"])
            for filename in stored:
                assert "/" not in filename and "\\" not in filename and filename not in ("", ".", "..")
                assert not filename.startswith(".")
            # Nothing was written outside the data directory.
            assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
            for path in ["/download/..%2F..%2Fetc/passwd", "/download/%2e%2e/%2e%2e", "/download/a/..%2f..%2fx",
                         "/sessions/..%2F../objects/x", "/download/" + "A" * 5000 + "/x"]:
                r = await client.get(url + path, headers=H)
                assert r.status_code in (404, 405), (path, r.status_code)
                assert "error" in r.json()
            for sid in ["..%2F..", "%00", "A" * 5000, "%ff%fe"]:
                r = await client.get(f"{url}/files/{sid}", headers=H)
                assert r.status_code in (200, 404, 405) and isinstance(r.json(), (list, dict))
            r = await client.delete(f"{url}/files/..%2F../..%2F..", headers=H)
            assert r.status_code == 404
            await still_serving(client, url)
    no_server_errors(logs)


async def test_malformed_and_oversized_multipart(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path, max_file_size_mb=1, max_files_per_session=3) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            async def upload(body: bytes, ctype: str) -> httpx.Response:
                return await client.post(url + "/upload", headers={**H, "Content-Type": ctype}, content=body)

            body, ctype = multipart([("file", "big.bin", b"\0" * (1024 * 1024 + 1))])
            r = await upload(body, ctype)
            assert r.status_code == 413 and "exceeds maximum size of 1MB" in r.json()["error"]
            body, ctype = multipart([("file", f"f{i}.txt", b"x") for i in range(4)])
            assert (await upload(body, ctype)).status_code == 413
            assert (await upload(b"garbage", "multipart/form-data")).status_code == 400  # no boundary
            assert (await upload(b"garbage", "multipart/form-data; boundary=zz")).status_code == 400
            truncated = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
            assert (await upload(truncated, "multipart/form-data; boundary=zz")).status_code == 400
            body, ctype = multipart([("entity_id", None, b"\xff\xfe")])
            assert (await upload(body, ctype)).status_code == 400  # a field that is not UTF-8
            body, ctype = multipart([("entity_id", None, b"x" * 100_000), ("file", "a.txt", b"x")])
            assert (await upload(body, ctype)).status_code == 400  # a huge form field
            body, ctype = multipart([("other", "a.txt", b"x")])
            assert (await upload(body, ctype)).status_code == 422  # no file part
            assert (await upload(b"{}", "application/json")).status_code == 415
            assert (await upload(b"x", "")).status_code == 415
            await still_serving(client, url)
            # Refused uploads left nothing in the spool.
            assert list((tmp_path / "spool").iterdir()) == []
    no_server_errors(logs)


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"<exec/>", "text/xml", 415),
        (b'{"code": "x", "lang": "py"}', "", 415),
        (b'{"code": "x", "lang": "py"', "application/json", 422),
        (b'{"code": "\xff\xfe", "lang": "py"}', "application/json", 422),  # invalid UTF-8
        (b'{"code": "x", "lang": "\\ud800"}', "application/json", 422),  # lone surrogate
        (b'{"code": "x", "lang": "py", "files": [{"id": "\\udfff", "session_id": "s", "name": "n"}]}',
         "application/json", 422),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 422),  # nesting deeper than any parser
        (b'{"code": ' + b"1" * 5000 + b', "lang": "py"}', "application/json", 422),  # over-long integer
        (b'["code", "lang"]', "application/json", 422),
        (b'"just a string"', "application/json", 422),
        (b'{"code": null, "lang": "py"}', "application/json", 422),
        (b'{"code": "x", "lang": "cobol"}', "application/json", 400),
        (b'{"code": "x", "lang": 12}', "application/json", 422),
        (b'{"code": "   ", "lang": "py"}', "application/json", 400),
        (b'{"code": "x", "lang": "py", "files": null}', "application/json", 422),
        (b'{"code": "x", "lang": "py", "entity_id": "../../x"}', "application/json", 422),
    ],
)
async def test_bad_exec_bodies(tmp_path: Path, logs: LogCapture, content: bytes, content_type: str, status: int) -> None:
    async with ops_server(tmp_path) as (url, program, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", headers={**H, "Content-Type": content_type}, content=content)
            assert r.status_code == status, r.text
            assert r.json()["error"]
            assert program.cancelled == 0
            await still_serving(client, url)
    no_server_errors(logs)


async def test_huge_json_and_big_code(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=30) as client:
            big = json.dumps({"code": "x", "lang": "py", "pad": "y" * (5 * 1024 * 1024)})
            r = await client.post(url + "/exec", headers={**H, "Content-Type": "application/json"}, content=big)
            assert r.status_code == 413 and "too large" in r.json()["error"]
            # 1 MB of code is fine (the limit is 1 MiB); one byte over the limit is a 413.
            code = "#" * 999_990 + "\nok"
            r = await client.post(url + "/exec", headers=H, json={"code": code, "lang": "py"})
            assert r.status_code == 200 and r.json()["stdout"] == "done\n"
            r = await client.post(url + "/exec", headers=H, json={"code": "#" * (1024 * 1024 + 1), "lang": "py"})
            assert r.status_code == 413 and r.json()["details"][0]["code"] == "code_too_large"
            await still_serving(client, url)
    no_server_errors(logs)


async def test_a_million_output_lines_are_truncated_cleanly(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(url + "/exec", headers=H, json={"code": "lines:1000000", "lang": "py"})
            assert r.status_code == 200
            stdout = r.json()["stdout"]
            assert len(stdout) < 70_000 and "[Output truncated - size limit exceeded]" in stdout
            await still_serving(client, url)
    no_server_errors(logs)


async def drip(stream: trio.SocketStream, interval: float) -> None:
    try:
        while True:
            await stream.send_all(b" ")
            await trio.sleep(interval)  # the scenario itself: a client that trickles bytes
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.parametrize("route", ["/exec", "/upload"])
async def test_a_dripping_body_gets_408(tmp_path: Path, logs: LogCapture, route: str) -> None:
    async with ops_server(tmp_path, kcr_body_timeout=1.0) as (url, _, _):
        ctype = "application/json" if route == "/exec" else "multipart/form-data; boundary=zz"
        stream = await raw(
            port_of(url),
            f"POST {route} HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 100000\r\n\r\n".encode(),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, stream, 0.2)
            with trio.fail_after(10):
                response = b""
                while b"\r\n\r\n" not in response:
                    response += await stream.receive_some()
            nursery.cancel_scope.cancel()
        assert response.startswith(b"HTTP/1.1 408")
        await stream.aclose()
        await await_until(lambda: any(a["status"] == 408 for a in logs.access()), 5, message="408 access line")
        async with httpx.AsyncClient(timeout=10) as client:
            await still_serving(client, url)
            m = await get_metrics(client, url)
            assert total(m, "kcr_http_requests_total", route=route, status="408") == 1
    no_server_errors(logs)


class SlowStore(memory_sessions.MemorySessionStore):
    """The memory store, with every read and write stuck while ``stuck`` is set (a dead Redis)."""

    stuck = False

    async def _maybe_stick(self) -> None:
        if SlowStore.stuck:
            await trio.sleep_forever()

    async def get_session(self, session_id: str) -> Any:
        await self._maybe_stick()
        return await super().get_session(session_id)

    async def create_session(self, **kwargs: Any) -> Any:
        await self._maybe_stick()
        return await super().create_session(**kwargs)

    async def list_files(self, session_id: str) -> Any:
        await self._maybe_stick()
        return await super().list_files(session_id)

    async def ping(self) -> dict[str, Any]:
        await self._maybe_stick()
        return await super().ping()


async def test_a_stuck_store_gets_clean_timeouts(tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_sessions, "MemorySessionStore", SlowStore)
    monkeypatch.setattr(SlowStore, "stuck", False)
    async with ops_server(tmp_path, max_execution_time=1, kcr_exec_overhead=1.0, kcr_request_timeout=1.0,
                          kcr_ready_timeout=0.5, kcr_heartbeat_grace=0.3) as (url, _, executor):
        async with httpx.AsyncClient(timeout=15) as client:
            SlowStore.stuck = True
            # /exec: its own deadline (run time + overhead) answers. Inputs are looked up before a
            # sandbox is taken, so the commit is still held (no sandbox yet, 2 s < the 4 s hold cap).
            r = await client.post(url + "/exec", headers=H, json={"code": "ok", "lang": "py"})
            assert r.status_code == 200
            # Truthful: the store was stuck, so nothing ran (audit finding 4).
            assert r.json()["stderr"].startswith("Request timed out after 2 seconds while looking up")
            assert r.json()["stderr"].endswith("the code did not run") and r.json()["stdout"] == ""
            # Other routes: KCR_REQUEST_TIMEOUT, then a 504 in shape B.
            r = await client.get(url + "/files/" + "A" * 21, headers=H)
            assert r.status_code == 504 and r.json()["error_type"] == "timeout"
            # Readiness names the culprit, within its per-check deadline, and is not a 500.
            r = await client.get(url + "/ready")
            assert r.status_code == 503
            assert r.json()["checks"]["sessions"]["ok"] is False and "no answer" in r.json()["checks"]["sessions"]["error"]
            assert r.json()["checks"]["executor"]["ok"] is True
            assert (await client.get(url + "/health")).status_code == 200
            m = await get_metrics(client, url)
            assert total(m, "kcr_http_requests_total", route="/exec", outcome="timeout") == 1
            assert total(m, "kcr_http_requests_total", route="/files/<session_id>", status="504", outcome="timeout") == 1
            assert executor.released == 0  # no sandbox was taken while the store was stuck
            SlowStore.stuck = False
            await still_serving(client, url)
    outcomes = [(a["path"].split("/")[1], a["status"], a["outcome"]) for a in logs.access()]
    assert ("exec", 200, "timeout") in outcomes and ("files", 504, "timeout") in outcomes
    assert any("exec deadline reached in phase" in line.get("event", "") for line in logs.lines())


async def test_a_store_that_raises_is_reported_not_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenStore(memory_sessions.MemorySessionStore):
        async def ping(self) -> dict[str, Any]:
            raise KeyError("a bug in a backend")

    monkeypatch.setattr(memory_sessions, "MemorySessionStore", BrokenStore)
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url + "/ready")
            assert r.status_code == 503
            assert r.json()["checks"]["sessions"]["error"] == "unexpected error: KeyError"
            await still_serving(client, url)


async def test_http_level_garbage(tmp_path: Path, logs: LogCapture) -> None:
    """Requests Hypercorn itself rejects never reach the app, and do not hurt it."""
    async with ops_server(tmp_path) as (url, _, _):
        port = port_of(url)
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
                        b"POST /exec HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
                        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"):
            stream = await raw(port, garbage)
            answer = await read_all(stream, 5)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
            await stream.aclose()
        async with httpx.AsyncClient(timeout=10) as client:
            await still_serving(client, url)
    no_server_errors(logs)


async def test_dripped_or_missing_headers_are_cut_at_the_idle_timeout(tmp_path: Path) -> None:
    """Slowloris on the request line and headers: Hypercorn's idle timer closes those connections."""
    async with ops_server(tmp_path, kcr_keep_alive_timeout=6.0) as (url, _, _):
        port = port_of(url)
        closed_after: dict[str, float] = {}

        async def client(mode: str) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def dripper() -> None:
                    if mode != "drip":
                        return
                    try:  # a valid request line, then one header line a second: the headers never end
                        await stream.send_all(b"GET /health HTTP/1.1\r\n")
                        while True:
                            await trio.sleep(1.0)  # the scenario itself, not synchronisation
                            await stream.send_all(b"X-Slow: yes\r\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(dripper)
                with trio.fail_after(15):
                    try:
                        while await stream.receive_some():
                            pass
                    except trio.BrokenResourceError:
                        pass
                closed_after[mode] = trio.current_time() - start
                nursery.cancel_scope.cancel()
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for mode in ("silent", "drip"):
                nursery.start_soon(client, mode)
        assert all(5.0 < after < 9.0 for after in closed_after.values()), closed_after
        async with httpx.AsyncClient(timeout=10) as c:
            await still_serving(c, url)
