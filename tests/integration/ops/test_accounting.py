"""Access accounting at the connection's edge, with raw sockets against the real server.

``ok`` means the last byte of the answer was handed to the transport, even if the client closes at
once (curl does, as soon as it holds Content-Length bytes); ``client_gone`` means the client left
before that. A request head that stalls gets a 408 before the close; an idle kept-alive connection
is just closed.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.ops import H, LogCapture, ops_server, port_of, raw
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration


def lines_for(logs: LogCapture, request_id: str) -> list[dict]:
    return [a for a in logs.access() if a["request_id"] == request_id]


async def read_response(stream: trio.SocketStream, deadline: float = 20.0) -> tuple[bytes, bytes]:
    """One Content-Length framed response: (head, body), read exactly as curl would."""
    data = b""
    with trio.fail_after(deadline):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            assert chunk, f"EOF before the head ended: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = await stream.receive_some()
            assert chunk, f"EOF after {len(body)} of {length} body bytes"
            body += chunk
    return head, body


async def read_to_eof(stream: trio.SocketStream, deadline: float) -> bytes:
    """Everything until the server closes; fails if it has not closed by the deadline."""
    out = b""
    with trio.fail_after(deadline):
        while chunk := await stream.receive_some():
            out += chunk
    return out


async def upload(url: str, size: int) -> tuple[str, str]:
    async with httpx.AsyncClient(timeout=60) as client:
        files = {"file": ("big.bin", b"\x01" * size, "application/octet-stream")}
        r = await client.post(url + "/upload", headers=H, files=files)
        assert r.status_code == 200, r.text
        return r.json()["session_id"], r.json()["files"][0]["fileId"]


def get(path: str, request_id: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nX-Request-ID: {request_id}\r\n\r\n".encode()


async def test_download_then_immediate_close_is_ok(tmp_path: Path, logs: LogCapture) -> None:
    size = 10_000_000
    async with ops_server(tmp_path, max_file_size_mb=20) as (url, _, _):
        sid, fid = await upload(url, size)
        for n in range(5):  # the close races the server's closing chunk; every round must say ok
            stream = await raw(port_of(url), get(f"/download/{sid}/{fid}", f"dl-{n}"))
            head, body = await read_response(stream)
            assert head.startswith(b"HTTP/1.1 200") and len(body) == size
            await stream.aclose()  # as curl: all Content-Length bytes in, close at once
        for n in range(5):
            await await_until(lambda n=n: lines_for(logs, f"dl-{n}"), 10, message=f"dl-{n} line")
            (line,) = lines_for(logs, f"dl-{n}")
            assert (line["status"], line["outcome"], line["bytes_out"]) == (200, "ok", size), line
            assert "client_gone_after_s" not in line


async def test_close_mid_download_is_client_gone(tmp_path: Path, logs: LogCapture) -> None:
    size = 30_000_000  # far more than the socket buffers hold
    async with ops_server(tmp_path, max_file_size_mb=40) as (url, _, _):
        sid, fid = await upload(url, size)
        stream = await raw(port_of(url), get(f"/download/{sid}/{fid}", "dl-cut"))
        with trio.fail_after(10):
            first = await stream.receive_some()
        assert first.startswith(b"HTTP/1.1 200")
        await stream.aclose()
        await await_until(lambda: lines_for(logs, "dl-cut"), 10, message="dl-cut line")
        (line,) = lines_for(logs, "dl-cut")
        assert line["outcome"] == "client_gone" and line["status"] == 200, line
        assert line["bytes_out"] < size and line["client_gone_after_s"] >= 0


async def test_full_exec_answer_then_immediate_close_is_ok(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path) as (url, _, _):
        for n in range(5):
            body = json.dumps({"code": "lines:5000", "lang": "py"}).encode()
            stream = await raw(
                port_of(url),
                f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nX-Request-ID: ex-{n}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body,
            )
            head, answer = await read_response(stream)
            assert head.startswith(b"HTTP/1.1 200") and json.loads(answer)["stdout"].count("x") == 5000
            await stream.aclose()
        for n in range(5):
            await await_until(lambda n=n: lines_for(logs, f"ex-{n}"), 10, message=f"ex-{n} line")
            (line,) = lines_for(logs, f"ex-{n}")
            assert (line["status"], line["outcome"]) == (200, "ok"), line


async def test_partial_head_gets_408_then_close(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path, kcr_head_timeout=0.5) as (url, _, _):
        stream = await raw(port_of(url), b"GET /health HTTP/1.1\r\nHost: t\r\n")  # no blank line: stalled
        data = await read_to_eof(stream, 15)  # the keep-alive timeout (75 s) is far off
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data
        assert b"connection: close" in head.lower()
        error = json.loads(body)
        assert error["error_type"] == "timeout" and error["error"] and error["request_id"]

        # The same on a kept-alive connection: one answered request, then half of the next head.
        stream = await raw(port_of(url), b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        first, _ = await read_response(stream)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        await stream.send_all(b"GET /health HT")
        data = await read_to_eof(stream, 15)
        assert data.startswith(b"HTTP/1.1 408"), data


async def test_idle_kept_alive_connection_closes_without_408(tmp_path: Path, logs: LogCapture) -> None:
    async with ops_server(tmp_path, kcr_keep_alive_timeout=5.5, kcr_head_timeout=0.5) as (url, _, _):
        stream = await raw(port_of(url), b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = await read_response(stream)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        # No byte of a new request: the keep-alive timeout just closes (RFC 9110 §15.5.9 allows it).
        assert await read_to_eof(stream, 20) == b""
        # A connection that never sent anything: the same.
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
        assert await read_to_eof(stream, 20) == b""
