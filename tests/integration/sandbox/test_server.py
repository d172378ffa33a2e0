"""The sandbox through a real ``kcr-trio serve`` process: sessions, the server's data directory and
environment, killing the server, and the start-up policy (refuse, or run unsandboxed and say so)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.sandbox import split_token
from tests.support.server import TEST_KEY, ServerProcess, server_process
from tests.support.sidecar import public_tmpdir

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}
SECRET, HALF_A, HALF_B = split_token()


@pytest.fixture(scope="module")
def data_dir() -> Iterator[str]:
    path = public_tmpdir("kcr-sandbox-server-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(data_dir: str) -> Iterator[ServerProcess]:
    env = {"KCR_SANDBOX": "bwrap", "KCR_DATA_DIR": data_dir, "POD_POOL_PY": "1", "POD_POOL_BASH": "1",
           "MAX_EXECUTION_TIME": "20", "KCR_ESCAPE_TEST_SECRET": SECRET}
    with server_process(env) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=H) as c:
        yield c


def exec_(client: httpx.Client, code: str, lang: str = "py", **extra: object) -> dict:
    r = client.post("/exec", json={"code": code, "lang": lang, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_ready_reports_the_sandbox(client: httpx.Client) -> None:
    body = client.get("/ready").json()
    assert body["status"] == "ready" and not body.get("warnings")
    assert body["checks"]["executor"]["sandbox"] == "bwrap"


SNOOP = """import os
secret = (HALF_A + HALF_B).encode()
print('data-dir', os.path.exists(DATA_DIR))
hits = []
for top in ('/mnt/data', '/tmp', '/run', '/dev/shm', '/etc'):
    for d, _dirs, names in os.walk(top):
        for n in names:
            try:
                with open(os.path.join(d, n), 'rb') as fh:
                    if secret in fh.read(1 << 20):
                        hits.append(os.path.join(d, n))
            except OSError:
                pass
for p in os.listdir('/proc'):
    if p.isdigit():
        for f in ('environ', 'cmdline'):
            try:
                if secret in open(f'/proc/{p}/{f}', 'rb').read():
                    hits.append(f'/proc/{p}/{f}')
            except OSError:
                pass
print('hits', hits)
print('env', [k for k in os.environ if 'KCR' in k or 'API' in k or 'SECRET' in k])
print('server', os.path.exists(f'/proc/{SERVER_PID}'))
print('mnt-data', sorted(os.listdir('/mnt/data')))
"""


def test_other_sessions_and_the_server_are_invisible(client: httpx.Client, server: ServerProcess,
                                                    data_dir: str) -> None:
    up = client.post("/upload", files={"file": ("secret.txt", SECRET.encode(), "text/plain")}).json()
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    own = exec_(client, "print(open('/mnt/data/secret.txt').read())",
                files=[{"id": fid, "session_id": sid, "name": "secret.txt"}])
    assert own["stdout"].strip() == SECRET
    # The file store holds the secret on the host; another session looks for it everywhere.
    assert any(SECRET.encode() in Path(d, n).read_bytes()
               for d, _, names in os.walk(data_dir) for n in names if "files" in d)
    code = (f"HALF_A, HALF_B, DATA_DIR, SERVER_PID = {HALF_A!r}, {HALF_B!r}, {data_dir!r}, {server.pid}\n"
            + SNOOP)
    body = exec_(client, code)
    out = dict(line.split(" ", 1) for line in body["stdout"].splitlines())
    assert out == {"data-dir": "False", "hits": "[]", "env": "[]", "server": "False",
                   "mnt-data": "['code.py']"}, body
    assert SECRET not in body["stdout"] + body["stderr"]


def test_killing_everything_leaves_the_server_serving(client: httpx.Client, server: ServerProcess) -> None:
    body = exec_(client, f"kill -9 -1; kill -9 $PPID; kill -9 {server.pid} 2>&1; echo still here", lang="bash")
    assert "still here" in body["stdout"] and "No such process" in body["stdout"]
    assert server.proc.poll() is None
    assert client.get("/health").status_code == 200
    assert exec_(client, "import os; print(os.getuid() != 0, os.getcwd())")["stdout"] == "True /mnt/data\n"


# --- start-up policy --------------------------------------------------------------------------


def _serve_until_exit(env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run ``kcr-trio serve`` expecting it to refuse to start; returns (exit code, stderr)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir = public_tmpdir("kcr-sandbox-refuse-")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "KCR_", "REDIS_", "MINIO_"))}
    full.update({"API_HOST": "127.0.0.1", "API_PORT": str(port), "API_KEY": TEST_KEY,
                 "KCR_DATA_DIR": data_dir, **env})
    try:
        proc = subprocess.run([sys.executable, "-m", "kcr_trio", "serve"], env=full, capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return proc.returncode, proc.stderr.decode("utf-8", "replace")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


BROKEN = {"KCR_LOCAL_BWRAP": "/nonexistent/bwrap"}  # what a host without a working bwrap looks like


@pytest.mark.parametrize("env", [
    {"KCR_SANDBOX": "auto", **BROKEN},
    {"KCR_SANDBOX": "bwrap", "KCR_UNSANDBOXED_TRUSTED": "true", **BROKEN},
    {"KCR_SANDBOX": "none"},
], ids=["auto-broken", "bwrap-broken-even-if-trusted", "none-untrusted"])
def test_refuses_to_start_without_a_sandbox(env: dict[str, str]) -> None:
    code, stderr = _serve_until_exit(env)
    assert code != 0
    assert "KCR_UNSANDBOXED_TRUSTED" in stderr or "refusing to start the local executor" in stderr


def test_unsandboxed_only_when_trusted_and_loudly() -> None:
    with server_process({"KCR_SANDBOX": "auto", "KCR_UNSANDBOXED_TRUSTED": "true", "POD_POOL_PY": "1",
                         **BROKEN}) as proc:
        with httpx.Client(base_url=proc.url, timeout=60, headers=H) as c:
            body = c.get("/ready").json()
            assert any("UNSANDBOXED" in w for w in body.get("warnings", [])), body
            assert body["checks"]["executor"]["sandbox"] == "none"
            # Without the sandbox there is no /mnt/data: programs run in a per-run directory.
            assert exec_(c, "import os; print(os.getcwd())")["stdout"].strip() != "/mnt/data"
        assert any("UNSANDBOXED" in line for line in proc.log_lines())
