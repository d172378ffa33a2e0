"""Request-owned work with real sidecars: busy answers, disconnects, and SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import TEST_KEY, server_process, wait_until

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}


def pids_with_marker(marker: str) -> list[int]:
    """Processes whose command line or environment-free argv contains ``marker`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def in_use(url: str) -> int:
    return httpx.get(url + "/ready", timeout=5).json()["checks"]["executor"]["in_use"]


def start_exec(url: str, code: str, lang: str = "py") -> socket.socket:
    """Send a raw /exec and return the socket without reading (so we can drop it)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"code": code, "lang": lang}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {TEST_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    return sock


def test_disconnect_kills_the_process_tree_and_frees_the_slot() -> None:
    marker = f"kcrmark{os.getpid()}x{time.monotonic_ns()}"
    # The program starts a grandchild in its own session and a shell background job, then waits:
    # all of it must die when the client leaves. ``exec -a`` puts the marker in their argv.
    code = (
        "import subprocess, time\n"
        f"subprocess.Popen(['bash', '-c', 'exec -a {marker}-a sleep 300'], start_new_session=True)\n"
        f"subprocess.Popen(['bash', '-c', '(exec -a {marker}-b sleep 301) & wait'])\n"
        "time.sleep(300)\n"
    )
    with server_process({"MAX_EXECUTION_TIME": "60", "POD_POOL_PY": "1"}) as server:
        sock = start_exec(server.url, code)
        wait_until(lambda: len(pids_with_marker(marker)) >= 2, 20, message="program and grandchildren running")
        assert in_use(server.url) == 1
        sock.close()
        wait_until(lambda: not pids_with_marker(marker), 10, message="every process of the run gone")
        wait_until(lambda: in_use(server.url) == 0, 10, message="slot free again")
        # and the server still serves
        r = httpx.post(server.url + "/exec", json={"code": "print(2)", "lang": "py"}, headers=H, timeout=30)
        assert r.json()["stdout"] == "2\n"
    lines = [json.loads(ln) for ln in server.log_lines() if ln.startswith("{") and '"event":"access"' in ln]
    assert any(ln["outcome"] == "client_gone" and ln["path"] == "/exec" for ln in lines)


def test_busy_is_an_explicit_503_with_retry_after() -> None:
    env = {"MAX_CONCURRENT_EXECUTIONS": "1", "KCR_ACQUIRE_TIMEOUT": "0.5", "KCR_BUSY_RETRY_AFTER": "3",
           "MAX_EXECUTION_TIME": "30", "POD_POOL_PY": "1", "KCR_HEARTBEAT_GRACE": "5"}
    with server_process(env) as server:
        sock = start_exec(server.url, "import time; time.sleep(60)")
        try:
            wait_until(lambda: in_use(server.url) == 1, 20, message="first run holding the only slot")
            r = httpx.post(server.url + "/exec", json={"code": "print(1)", "lang": "py"}, headers=H, timeout=30)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "3"
            assert r.json()["error_type"] == "service_unavailable"
        finally:
            sock.close()
        wait_until(lambda: in_use(server.url) == 0, 10, message="slot free")
        r = httpx.post(server.url + "/exec", json={"code": "print(1)", "lang": "py"}, headers=H, timeout=30)
        assert r.status_code == 200


def test_sigterm_drains_in_flight_runs_then_exits() -> None:
    env = {"MAX_EXECUTION_TIME": "30", "POD_POOL_PY": "2", "KCR_GRACEFUL_TIMEOUT": "20"}
    with server_process(env) as server:
        with httpx.Client(base_url=server.url, headers=H, timeout=60) as client:
            import threading

            results: dict[str, httpx.Response] = {}

            def run() -> None:
                results["r"] = client.post("/exec", json={"code": "import time; time.sleep(3); print('finished')", "lang": "py"})

            worker = threading.Thread(target=run)
            worker.start()
            wait_until(lambda: in_use(server.url) == 1, 20, message="run in flight")
            os.killpg(server.pid, signal.SIGTERM)
            # New connections are refused once the listener closes...
            def refused() -> bool:
                try:
                    httpx.get(server.url + "/health", timeout=1)
                    return False
                except httpx.HTTPError:
                    return True
            wait_until(refused, 10, message="listener closed")
            worker.join(timeout=40)
            # ...while the in-flight run finished and was answered in full.
            assert results["r"].status_code == 200 and results["r"].json()["stdout"] == "finished\n"
            assert server.proc.wait(timeout=30) == 0


def test_sigterm_cancels_runs_that_outlast_the_grace() -> None:
    env = {"MAX_EXECUTION_TIME": "60", "POD_POOL_PY": "1", "KCR_GRACEFUL_TIMEOUT": "1"}
    marker = f"kcrdrain{time.monotonic_ns()}"
    with server_process(env) as server:
        code = f"import subprocess, time\nsubprocess.Popen(['bash', '-c', 'exec -a {marker} sleep 300'])\ntime.sleep(300)\n"
        sock = start_exec(server.url, code)
        try:
            wait_until(lambda: pids_with_marker(marker), 20, message="run started")
            os.killpg(server.pid, signal.SIGTERM)
            assert server.proc.wait(timeout=30) == 0
            wait_until(lambda: not pids_with_marker(marker), 10, message="run killed on shutdown")
        finally:
            sock.close()
