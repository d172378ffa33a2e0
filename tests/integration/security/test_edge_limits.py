"""HTTP-edge findings: unauthenticated memory (3), auth lockout (5), metrics cardinality (10),
protocol edges (12). In-process servers on real sockets with the in-process executor twin."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.ops import H, ops_server, port_of, raw
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration


async def _response_head(stream: trio.SocketStream, timeout: float = 10.0) -> bytes:
    """Bytes until the end of the response head (fails if none arrives within ``timeout``)."""
    data = b""
    with trio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


def _anonymous_post(length: int | None) -> bytes:
    head = "POST /exec HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (head + "\r\n").encode()


# -- finding 3: what an unauthenticated request may hold --------------------------------------------


async def test_unauthenticated_body_is_refused_before_it_is_buffered(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_unauth_body_bytes=64 * 1024) as (url, _, _):
        port = port_of(url)
        # Declared too big: answered at once, without waiting for (or keeping) the 3 MiB.
        stream = await raw(port, _anonymous_post(3 * 1024 * 1024) + b"{" + b" " * 1000)
        head = await _response_head(stream)
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
        await stream.aclose()
        # Chunked, no length: refused once the cap is reached, while the client is still sending.
        stream = await raw(port, _anonymous_post(None))
        chunk = b" " * 32768
        for _ in range(3):
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = await _response_head(stream)
        assert head.startswith(b"HTTP/1.1 413")
        await stream.aclose()
        # LibreChat's small body-key requests still work.
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "LIBRECHAT_CODE_API_KEY": TEST_KEY})
            assert r.status_code == 200 and r.json()["stdout"] == "done\n"


async def test_unauthenticated_bodies_share_one_global_budget(tmp_path: Path) -> None:
    per_request, budget = 64 * 1024, 4 * 64 * 1024
    async with ops_server(tmp_path, kcr_unauth_body_bytes=per_request, kcr_unauth_body_budget_bytes=budget) as (
        url, _, _,
    ):
        port = port_of(url)
        held: list[trio.SocketStream] = []
        refused = None
        for _ in range(12):
            stream = await raw(port, _anonymous_post(per_request) + b" " * 60_000)
            with trio.move_on_after(2):  # a held request answers nothing: wait a bounded time
                refused = await _response_head(stream)
                await stream.aclose()
                break
            held.append(stream)
        assert refused is not None and refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after" in refused.lower()
        assert 3 <= len(held) <= 4  # the budget admits four 60 kB bodies at most
        for stream in held:
            await stream.aclose()
        # The budget is given back when those requests end.
        async with httpx.AsyncClient(timeout=10) as client:
            async def accepted() -> bool:
                r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "api_key": TEST_KEY,
                                                           "pad": " " * 50_000})
                return r.status_code == 200

            await await_until(accepted, 10, interval=0.1, message="budget released")


# -- finding 4: file refs are capped --------------------------------------------------------------


async def test_too_many_file_refs_is_413(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_max_file_refs=5) as (url, _, _):
        refs = [{"id": f"f{i:020d}", "session_id": f"s{i:020d}", "name": f"{i}.csv"} for i in range(6)]
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "files": refs}, headers=H)
            assert r.status_code == 413
            assert r.json()["error"] == "Too many files: at most 5 file references per request"
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "files": refs[:5]}, headers=H)
            assert r.status_code == 200


# -- finding 10: bounded metrics labels -----------------------------------------------------------


async def test_random_methods_do_not_mint_metric_series(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_metrics_auth=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(20):
                await client.request(f"X{i}RANDOM", url + "/files/x", headers=H)
            text = (await client.get(url + "/metrics")).text
        methods = set()
        for line in text.splitlines():
            if line.startswith("kcr_http_requests_total{"):
                methods.add(line.split('method="', 1)[1].split('"', 1)[0])
        assert "other" in methods and not any("RANDOM" in m for m in methods)


# -- finding 12: protocol edges -------------------------------------------------------------------


async def test_protocol_edges(tmp_path: Path) -> None:
    async with ops_server(tmp_path) as (url, _, _):
        port = port_of(url)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.put(url + "/exec", headers=H)
            assert r.status_code == 405 and r.json()["error_type"] == "validation"
            # CORS is off by default: no Access-Control-* anywhere.
            for r in (await client.options(url + "/download/a/b", headers={"Origin": "https://evil.example"}),
                      await client.get(url + "/download/a/b", headers={**H, "Origin": "https://evil.example"})):
                assert not any(k.lower().startswith("access-control") for k in r.headers)
        # Both Content-Length and Transfer-Encoding: answered, then the connection is closed.
        body = json.dumps({"code": "x", "lang": "py"}).encode()
        request = (b"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: " + TEST_KEY.encode() +
                   b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" +
                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        stream = await raw(port, request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):  # ends only if the server closes
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
        # What h11 itself refuses is answered with a JSON body too.
        for bad, status in ((b"NOT HTTP AT ALL\r\n\r\n", 400),
                            (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
                            (b"POST /exec HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501)):
            stream = await raw(port, bad)
            data = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            head, _, payload = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d" % status), data[:200]
            assert b"application/json" in head.lower() and json.loads(payload)["error"]


async def test_cors_when_configured(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_cors_origins="https://app.example") as (url, _, _), \
            httpx.AsyncClient(timeout=10) as client:
        r = await client.options(url + "/download/a/b", headers={"Origin": "https://app.example"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await client.options(url + "/download/a/b", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_half_closed_client_gets_its_answer(tmp_path: Path) -> None:
    async with ops_server(tmp_path) as (url, program, _):
        body = json.dumps({"code": "sleep:1.5", "lang": "py"}).encode()
        for path, payload in (("/exec", body), ("/health", b"")):
            method = b"POST" if payload else b"GET"
            request = (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nX-API-Key: " + TEST_KEY.encode() +
                       b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            stream = await raw(port_of(url), request)
            await stream.send_eof()  # shutdown(SHUT_WR): the client still reads
            data = b""
            with trio.fail_after(20):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            # An interim 100 Continue may come first (the server's check that the client is there).
            if data.startswith(b"HTTP/1.1 100"):
                data = data.partition(b"\r\n\r\n")[2]
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            if path == "/exec":
                assert b'"stdout":"done\\n"' in data  # (the heartbeat answer is chunked)
        assert program.cancelled == 0


@pytest.mark.parametrize("heartbeat", [True, False])
async def test_a_client_that_really_leaves_is_still_cancelled(tmp_path: Path, heartbeat: bool) -> None:
    """TCP cannot tell a half-close from a close; the interim-response probe tells them apart, so a
    client that left is noticed before anything of the answer was written (also without heartbeat)."""
    async with ops_server(tmp_path, kcr_heartbeat_grace=0.2, kcr_heartbeat=heartbeat) as (url, program, _):
        body = json.dumps({"code": "forever", "lang": "py"}).encode()
        request = (b"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: " + TEST_KEY.encode() +
                   b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        stream = await raw(port_of(url), request)
        await await_until(lambda: program.running == 1, 10, message="run started")
        await stream.aclose()
        await await_until(lambda: program.cancelled == 1, 10, message="run cancelled after the client left")


async def test_a_client_leaving_after_the_commit_is_noticed_at_once(tmp_path: Path) -> None:
    """Input ending once the answer has started is a disconnect, not a half-close to wait out: the
    run is cancelled well before the next heartbeat byte (4 s here) would have revealed it."""
    async with ops_server(tmp_path, kcr_heartbeat_grace=0.2, kcr_heartbeat_interval=4.0) as (url, program, _):
        body = json.dumps({"code": "forever", "lang": "py"}).encode()
        request = (b"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: " + TEST_KEY.encode() +
                   b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        stream = await raw(port_of(url), request)
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b"1\r\n \r\n"):  # the head and the first heartbeat byte
                data += await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 200")  # committed: the heartbeat answer has started
        await stream.aclose()  # nothing unread: a plain FIN, like a half-close
        await await_until(lambda: program.cancelled == 1, 3.0, message="run cancelled before the next heartbeat")
