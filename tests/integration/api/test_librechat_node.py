"""LibreChat's real client stack against a real server: the "socket hang up at 5 s" regression.

Node 20 with axios (GET /files?detail=summary, timeout 5000) then node-fetch (POST /exec) on Node's
default global agent, exactly as LibreChat does (keepalive.md). The code really runs for 8 s in a
real sidecar. With the mitigations on it must succeed; with heartbeat and Connection: close both off
the same test must see the hang-up, which proves it can see the bug.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.server import TEST_KEY, server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "node" / "librechat_sequence.js"
SLEEP_8 = "import time; time.sleep(8); print('slept')"


def run_sequence(url: str, code: str, idle_ms: int = 0, axios_headers: str = "librechat") -> dict:
    if shutil.which("node") is None:
        pytest.fail("node is required (scripts/install.sh installs it)")
    done = subprocess.run(
        ["node", str(SCRIPT), url, TEST_KEY, code, "py", str(idle_ms), axios_headers],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ENV = {"MAX_EXECUTION_TIME": "20", "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "0"}


@pytest.mark.parametrize(
    ("heartbeat", "close"),
    [("true", "true"), ("true", "false"), ("false", "true")],
    ids=["both", "heartbeat-only", "close-only"],
)
def test_librechat_sequence_survives_a_slow_exec(heartbeat: str, close: str) -> None:
    with server_process({**ENV, "KCR_HEARTBEAT": heartbeat, "KCR_CONNECTION_CLOSE": close}) as server:
        result = run_sequence(server.url, SLEEP_8)
    assert result.get("ok"), result
    assert result["status"] == 200 and result["body"]["stdout"] == "slept\n"
    if close == "true":
        assert len(result["sockets"]) == 2  # the tainted socket was not reused for /exec


def test_axios_with_its_own_default_headers_also_gets_the_close() -> None:
    """The close rule picks axios by its default headers too (api/connection_policy.py), not only by
    LibreChat's User-Agent: with the heartbeat off, only the close can save this sequence."""
    with server_process({**ENV, "KCR_HEARTBEAT": "false"}) as server:
        result = run_sequence(server.url, SLEEP_8, axios_headers="default")
    assert result.get("ok"), result
    assert result["body"]["stdout"] == "slept\n" and len(result["sockets"]) == 2


def test_without_mitigations_the_hangup_is_seen() -> None:
    with server_process({**ENV, "KCR_HEARTBEAT": "false", "KCR_CONNECTION_CLOSE": "false"}) as server:
        result = run_sequence(server.url, SLEEP_8)
    lines = server.log_lines()  # read after the server stopped: every line is flushed by now
    assert not result.get("ok") and "socket hang up" in result["error"], result
    assert 4800 <= result["elapsedMs"] <= 7000
    # The server noticed, cancelled the run, and logged the hang-up signature.
    gone = [json.loads(line) for line in lines if '"outcome":"client_gone"' in line]
    assert gone and gone[0]["path"] == "/exec" and gone[0]["hangup_signature"] is True


def test_idle_socket_reuse_after_6_s_has_no_reset() -> None:
    with server_process(ENV) as server:
        result = run_sequence(server.url, "print('again')", idle_ms=6000)
    assert result.get("ok"), result
    assert result["body"]["stdout"] == "again\n"
