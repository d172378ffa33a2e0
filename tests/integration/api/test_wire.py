"""What the server does on the socket: heartbeat bytes, Connection: close, idle timeout, disconnects.

The server runs in-process on a real loopback socket; the executor is the in-process twin, because
these tests are about the HTTP edge (real sidecars are exercised in test_contract.py). Each test reads
raw bytes, so nothing a client library does can hide what the server sent.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import pytest
import trio

from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.core.errors import Unavailable
from kcr_trio.core.model import RunResult
from tests.support.server import TEST_KEY, await_until, make_settings, running_server

pytestmark = pytest.mark.integration


class Program:
    """Scripted runs: ``sleep:N`` waits N s, ``forever`` waits until cancelled, ``fail`` raises."""

    def __init__(self) -> None:
        self.running = 0
        self.cancelled = 0

    async def __call__(self, code: str, files: dict[str, bytes]) -> RunResult:
        self.running += 1
        try:
            if code.startswith("sleep:"):
                await trio.sleep(float(code.split(":")[1]))
            elif code == "forever":
                await trio.sleep_forever()
            elif code == "fail":
                await trio.sleep(1.5)
                raise Unavailable("Sandbox failed: pod was evicted")
            return RunResult(0, "done", "")
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: str = "") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\n{headers}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    await stream.send_all(head.encode() + b"\r\n" + body)
    return stream


async def read_timed(stream: trio.SocketStream, limit: float) -> list[tuple[float, bytes]]:
    """All bytes until EOF (or ``limit`` seconds), each chunk with its arrival time."""
    start, chunks = time.monotonic(), []
    with trio.move_on_after(limit):
        while True:
            data = await stream.receive_some()
            if not data:
                break
            chunks.append((time.monotonic() - start, data))
    return chunks


def split_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return lines[0], headers, body


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


@pytest.fixture
async def server(tmp_path: Path):
    program = Program()
    executor = MemoryExecutor(program, capacity=2)
    settings = make_settings(tmp_path, kcr_keep_alive_timeout=6.0, kcr_heartbeat_grace=0.5, kcr_heartbeat_interval=1.0)
    async with running_server(settings, executor=executor) as url:
        yield port_of(url), program, executor


async def test_slow_exec_heartbeats_then_sends_complete_json(server) -> None:
    port, _, _ = server
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "sleep:3.2", "lang": "py"}).encode(),
                               "Connection: close\r\n")
    chunks = await read_timed(stream, 10)
    raw = b"".join(c for _, c in chunks)
    status, headers, body = split_response(raw)
    assert status.startswith("HTTP/1.1 200")
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["cache-control"] == "no-store, no-transform" and headers["x-accel-buffering"] == "no"
    payload = dechunk(body)
    assert payload.startswith(b" ") and payload.lstrip(b" ").startswith(b"{")
    assert json.loads(payload)["stdout"] == "done\n"
    # The first byte follows the grace at once, and the socket never stays silent longer than the
    # heartbeat interval (plus scheduling slack): that is what keeps LibreChat's 5 s timer quiet.
    first = chunks[0][0]
    assert first < 0.5 + 0.75
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(chunks)]
    assert max(gaps) < 1.0 + 0.75


async def test_fast_exec_is_a_plain_response(server) -> None:
    port, _, _ = server
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "sleep:0", "lang": "py"}).encode(),
                               "Connection: close\r\n")
    status, headers, body = split_response(b"".join(c for _, c in await read_timed(stream, 5)))
    assert status.startswith("HTTP/1.1 200") and headers.get("content-length") == str(len(body))
    assert json.loads(body)["stdout"] == "done\n"


async def test_error_after_commit_goes_in_stderr(server) -> None:
    port, _, _ = server
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "fail", "lang": "py"}).encode(),
                               "Connection: close\r\n")
    status, _, body = split_response(b"".join(c for _, c in await read_timed(stream, 10)))
    assert status.startswith("HTTP/1.1 200")
    payload = json.loads(dechunk(body))
    assert payload["stderr"] == "Sandbox failed: pod was evicted"
    assert payload["stdout"] == "" and payload["files"] == []


@pytest.mark.parametrize("path", ["/files/abcdef?detail=summary", "/download/abc/def", "/sessions/abc/objects/def"])
async def test_connection_close_really_closes(server, path: str) -> None:
    """LibreChat's axios requests (its User-Agent) get the close (other clients: test_keepalive_policy.py)."""
    port, _, _ = server
    stream = await raw_request(port, "GET", path, headers="User-Agent: LibreChat/1.0\r\n")
    chunks = await read_timed(stream, 3)
    raw = b"".join(c for _, c in chunks)
    _, headers, _ = split_response(raw)
    assert headers["connection"] == "close"
    assert chunks[-1][0] < 2.5, "the server left the socket open after Connection: close"


async def test_upload_response_closes_connection(server) -> None:
    port, _, _ = server
    boundary = "XyZ"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n").encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"POST /upload HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nUser-Agent: LibreChat/1.0\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(form)}\r\n\r\n".encode() + form
    )
    chunks = await read_timed(stream, 3)
    status, headers, body = split_response(b"".join(c for _, c in chunks))
    assert status.startswith("HTTP/1.1 200") and headers["connection"] == "close"
    assert json.loads(body)["message"] == "success"
    assert chunks[-1][0] < 2.5


async def test_idle_keepalive_connection_is_closed_after_the_timeout(server) -> None:
    port, _, _ = server
    stream = await raw_request(port, "GET", "/health")
    start = time.monotonic()
    first = await stream.receive_some()
    assert split_response(first)[0].startswith("HTTP/1.1 200")
    eof_after = None
    with trio.move_on_after(12):
        while await stream.receive_some():
            pass
        eof_after = time.monotonic() - start
    # Closed by the server's idle timer (6 s here): never before a client's 5 s timer could fire
    # first, and not left open forever (Hypercorn + Quart-Trio did that before api.scope's fix).
    assert eof_after is not None, "idle connection still open after 12 s"
    assert 5.0 < eof_after < 9.0


async def test_disconnect_cancels_the_run_and_frees_the_slot(server, caplog: pytest.LogCaptureFixture) -> None:
    port, program, executor = server
    caplog.set_level(logging.INFO, logger="kcr_trio.access")
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "forever", "lang": "py"}).encode())
    await await_until(lambda: program.running == 1, 5, message="run started")
    await stream.aclose()
    await await_until(lambda: program.cancelled == 1 and executor.released == 1, 5, message="run cancelled")
    await await_until(lambda: any('"outcome":"client_gone"' in r.getMessage() for r in caplog.records), 5,
                      message="client_gone access log line")
    line = next(json.loads(r.getMessage()) for r in caplog.records if '"outcome":"client_gone"' in r.getMessage())
    assert line["path"] == "/exec" and line["client_gone_after_s"] > 0


@pytest.fixture
async def busy_server(tmp_path: Path):
    """Capacity 1, grace 0.5 s; acquisition waits 1.5 s, the commit may be held up to 3 s."""
    program = Program()
    executor = MemoryExecutor(program, capacity=1, retry_after=4)
    settings = make_settings(tmp_path, kcr_heartbeat_grace=0.5, kcr_heartbeat_interval=1.0,
                             kcr_acquire_timeout=1.5, kcr_commit_hold_max=3.0)
    async with running_server(settings, executor=executor) as url:
        yield port_of(url), program


async def test_busy_is_a_real_503_even_after_the_grace(busy_server) -> None:
    port, program = busy_server
    holder = await raw_request(port, "POST", "/exec", json.dumps({"code": "forever", "lang": "py"}).encode())
    await await_until(lambda: program.running == 1, 5, message="first run holding the only slot")
    stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "sleep:0", "lang": "py"}).encode(),
                               "Connection: close\r\n")
    chunks = await read_timed(stream, 6)
    status, headers, body = split_response(b"".join(c for _, c in chunks))
    # Nothing was sent during the grace or the acquisition wait; then a real status, not a 200.
    assert status.startswith("HTTP/1.1 503"), status
    assert headers["retry-after"] == "4"
    assert json.loads(body)["error_type"] == "service_unavailable"
    assert 1.4 < chunks[0][0] < 3.0
    await holder.aclose()


async def test_acquisition_longer_than_the_hold_commits_and_reports_busy_in_stderr(tmp_path: Path) -> None:
    program = Program()
    executor = MemoryExecutor(program, capacity=1)
    settings = make_settings(tmp_path, kcr_heartbeat_grace=0.5, kcr_heartbeat_interval=1.0,
                             kcr_acquire_timeout=4.5, kcr_commit_hold_max=2.0)
    async with running_server(settings, executor=executor) as url:
        port = port_of(url)
        holder = await raw_request(port, "POST", "/exec", json.dumps({"code": "forever", "lang": "py"}).encode())
        await await_until(lambda: program.running == 1, 5, message="first run holding the only slot")
        stream = await raw_request(port, "POST", "/exec", json.dumps({"code": "sleep:0", "lang": "py"}).encode(),
                                   "Connection: close\r\n")
        chunks = await read_timed(stream, 10)
        status, _, body = split_response(b"".join(c for _, c in chunks))
        # Silence is never allowed to reach the client's 5 s timer: the 200 is committed at the hold
        # cap, and the busy answer arrives inside the complete JSON body.
        assert status.startswith("HTTP/1.1 200")
        assert chunks[0][0] < 2.0 + 0.75
        payload = json.loads(dechunk(body))
        assert "busy" in payload["stderr"].lower() or "capacity" in payload["stderr"].lower()
        await holder.aclose()
