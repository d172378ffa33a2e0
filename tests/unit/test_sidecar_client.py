"""``SidecarSandbox`` mapping KubeCodeRun's runner answers (pure logic over httpx.MockTransport).

The real-process tests of the client are in ``tests/integration/sidecar/test_local_executor.py``;
here we emulate the two KubeCodeRun runners' documented quirks (kubecoderun-internals.md §2.2).
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from kcr_trio.backends.sidecar_client import SidecarSandbox
from kcr_trio.core.errors import NotFound, Unavailable


async def one(data: bytes):  # type: ignore[no-untyped-def]
    yield data


def sandbox(handler) -> tuple[SidecarSandbox, httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return SidecarSandbox("http://runner:8080", client=client), client


async def test_go_runner_timeout_minus_one_and_listing_fallback() -> None:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/execute":
            body = json.loads(request.content)
            assert body["timeout"] == 1 and isinstance(body["timeout"], int)
            await trio.sleep(1.0)  # the runner's own deadline passing
            return httpx.Response(200, json={"exit_code": -1, "stdout": "partial", "stderr": "",
                                             "execution_time_ms": 1000})
        if request.method == "POST" and request.url.path == "/files":
            assert b'filename="data.csv"' in request.content
            return httpx.Response(200, json={"uploaded": [{"name": "data.csv", "size": 3}]})
        if request.url.path == "/files":
            return httpx.Response(200, json={"files": [
                {"name": "data.csv", "path": "data.csv", "size": 3},   # untouched input
                {"name": "main.go", "path": "main.go", "size": 50},    # runner source
                {"name": "Code.class", "path": "Code.class", "size": 500},
                {"name": "chart.png", "path": "chart.png", "size": 1234}]})
        return httpx.Response(404)

    sb, client = sandbox(handler)
    async with client:
        await sb.put_file("data.csv", one(b"1,2"))
        res = await sb.run("x", timeout=0.6, request_id="r")
        assert res.timed_out and res.exit_code == 124 and res.stdout == "partial"
        assert "timed out after 1 seconds" in res.stderr and res.generated is None
        gen = await sb.generated_files()
        assert [(g.name, g.size, g.content_type) for g in gen] == [("chart.png", 1234, "image/png")]


async def test_our_sidecar_generated_field_is_used_and_exit_124_without_timeout_is_not_a_timeout() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/execute" and request.headers["x-request-id"] == "r2"
        return httpx.Response(200, json={"exit_code": 124, "stdout": "", "stderr": "",
                                         "generated": [{"name": "a.txt", "size": 1, "mime_type": "text/plain"}]})

    sb, client = sandbox(handler)
    async with client:
        res = await sb.run("exit 124", timeout=30, request_id="r2")
        assert res.exit_code == 124 and not res.timed_out  # answered at once: the program's own 124
        assert [g.name for g in await sb.generated_files()] == ["a.txt"]


async def test_index_html_redirect_is_not_followed_but_retried() -> None:
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        if request.url.raw_path == b"/files/index.html":
            return httpx.Response(301, headers={"location": "./"})
        if request.url.raw_path == b"/files/index.html/":
            return httpx.Response(200, content=b"<p>hi</p>")
        if request.url.raw_path == b"/files/a%20b%2F..%2Fc":
            return httpx.Response(404, json={"detail": "File not found"})
        return httpx.Response(500)

    sb, client = sandbox(handler)
    async with client:
        async with sb.open_file("index.html") as body:
            assert b"".join([c async for c in body]) == b"<p>hi</p>"
        with pytest.raises(NotFound):
            async with sb.open_file("a b/../c"):
                pass
    assert paths == ["/files/index.html", "/files/index.html/", "/files/a%20b%2F..%2Fc"]


async def test_server_errors_and_dropped_connections() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/execute":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(503, text="down")

    sb, client = sandbox(handler)
    async with client:
        res = await sb.run("x", timeout=5, request_id="r")
        assert res.failure and "stopped responding" in res.failure and res.exit_code == -1
        with pytest.raises(Unavailable):
            await sb.generated_files()
