"""Bad input and faults with real sidecars: a real ``kcr-trio serve`` process running real programs.

* a million tiny output lines: a clean, truncated 200 (and the server's memory is not the limit);
* 1 MB of code through the whole pipeline;
* the sidecar killed (SIGKILL) in the middle of a run: a clean answer, a metric, a log line, and
  the next run works on a fresh sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ops import H, scrape, total
from tests.support.server import ServerProcess, server_process, wait_until

pytest.importorskip("kcr_trio.backends.local_executor")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {"MAX_EXECUTION_TIME": "20", "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "0",
       "KCR_HEARTBEAT_GRACE": "0.5"}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    with server_process(ENV) as proc:
        yield proc


def access_lines(server: ServerProcess) -> list[dict]:
    out = []
    for line in server.log_lines():
        if line.startswith("{") and '"event":"access"' in line:
            out.append(json.loads(line))
    return out


def metrics(server: ServerProcess) -> dict:
    return scrape(httpx.get(server.url + "/metrics", headers=H, timeout=10).text)


def test_a_million_output_lines(server: ServerProcess) -> None:
    code = "import sys\nsys.stdout.write('x\\n' * 1_000_000)\nprint('tail')"
    r = httpx.post(server.url + "/exec", headers=H, json={"code": code, "lang": "py"}, timeout=60)
    assert r.status_code == 200
    stdout = r.json()["stdout"]
    assert stdout.startswith("x\nx\n") and "[Output truncated - size limit exceeded]" in stdout
    assert len(stdout) < 70_000
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_a_megabyte_of_code(server: ServerProcess) -> None:
    code = "#" + "-" * 999_000 + "\nprint('big ok')"
    r = httpx.post(server.url + "/exec", headers=H, json={"code": code, "lang": "py"}, timeout=60)
    assert r.status_code == 200 and r.json()["stdout"] == "big ok\n"


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _find(marker: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(int(p))]


def _kill_sidecar_mid_run(server: ServerProcess, marker: str) -> httpx.Response:
    """Start a run that leaves a marked grandchild, SIGKILL its sidecar, return the answer."""
    import threading

    code = (
        "import subprocess, time\n"
        f"subprocess.Popen(['bash', '-c', 'exec -a {marker} sleep 300'])\n"
        "time.sleep(300)\n"
    )
    result: dict = {}

    def call() -> None:
        try:
            result["response"] = httpx.post(server.url + "/exec", headers=H, json={"code": code, "lang": "py"},
                                            timeout=60)
        except httpx.HTTPError as exc:  # reported by the assertion below
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    try:
        program = wait_until(lambda: _find(marker), 30, message="program running")[0]
        sidecars = [p for p in _ancestors(program) if "-m sidecar" in _cmdline(p)]
        assert sidecars, f"no sidecar among the ancestors of {program}"
        os.kill(sidecars[-1], signal.SIGKILL)
    finally:
        caller.join(timeout=60)
    assert "response" in result, result
    return result["response"]


def _reap(marker: str) -> None:
    for pid in _find(marker):  # never leave a process behind, whatever the executor did
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sidecar_killed_mid_run(server: ServerProcess) -> None:
    marker = f"kcrfault{os.getpid()}x{time.monotonic_ns()}"
    try:
        response = _kill_sidecar_mid_run(server, marker)
    finally:
        _reap(marker)
    # Committed before the kill (heartbeat): a complete JSON document explaining it in stderr.
    # Not committed: a 503. Never a 500, never a dropped connection.
    if response.status_code == 200:
        body = json.loads(response.content)
        assert body["stdout"] == "" and body["stderr"] and body["files"] == []
    else:
        assert response.status_code == 503, response.text
    # The server keeps serving, on a fresh sandbox.
    r = httpx.post(server.url + "/exec", headers=H, json={"code": "print('after')", "lang": "py"}, timeout=60)
    assert r.status_code == 200 and r.json()["stdout"] == "after\n"
    # Access lines reach stderr in small batches (log_stream.FLUSH_DELAY): wait for it.
    wait_until(lambda: any(a["path"] == "/exec" and a["status"] in (200, 503) and a["outcome"] in ("error", "busy")
                           for a in access_lines(server)), 10,
               message="the killed run's access line")
    m = metrics(server)
    assert total(m, "kcr_http_requests_total", route="/exec", outcome="error") >= 1
    assert total(m, "kcr_pool_target", language="py") == 1


def test_programs_die_with_their_sidecar(server: ServerProcess) -> None:
    marker = f"kcrorphan{os.getpid()}x{time.monotonic_ns()}"
    try:
        _kill_sidecar_mid_run(server, marker)
        wait_until(lambda: not _find(marker), 15, message="the program died with its sidecar")
    finally:
        _reap(marker)


def test_client_leaving_a_real_run(server: ServerProcess) -> None:
    """A client that leaves mid-run: its program is killed; one line, under its own X-Request-ID."""
    import socket

    rid = f"rid-sidecar-{time.monotonic_ns()}"
    marker = f"kcrrid{os.getpid()}x{time.monotonic_ns()}"
    body = json.dumps({"code": f"import subprocess\nsubprocess.run(['bash', '-c', 'exec -a {marker} sleep 300'])",
                       "lang": "py"}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(
            f"POST /exec HTTP/1.1\r\nHost: t\r\nX-API-Key: {H['X-API-Key']}\r\nX-Request-ID: {rid}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_until(lambda: _find(marker), 30, message="program running")
    finally:
        sock.close()
    try:
        wait_until(lambda: not _find(marker), 15, message="program killed after the client left")
    finally:
        _reap(marker)
    [access] = wait_until(lambda: [a for a in access_lines(server) if a["request_id"] == rid], 10)
    assert access["outcome"] == "client_gone" and access["gone_in_phase"] == "execute"
    assert access["status"] in (None, 200) and access["client_gone_after_s"] > 0  # 200: heartbeat began
    m = metrics(server)
    assert total(m, "kcr_exec_killed_on_cancel_total") >= 1
