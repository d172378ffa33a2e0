"""The fast path's run in the request task (``api/exec_inline.py``) against the Quart route's run
task (``exec_http.start``), on the commit paths the plain cases of ``test_exec_fast.py`` do not
reach: a busy answer that comes while the commit is held (after the grace), an acquisition decided
while holding (the one signal the pacer is woken for), a run failing behind a committed ``200``, and
a client leaving a committed stream. Same in-process server and raw sockets; answers compared byte
for byte after masking; the access lines say which path each answer took."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from kcr_trio.api import exec_fast
from tests.integration.ops.test_exec_fast import JSON, ask, committed, masked, server, status_of
from tests.support.ops import LogCapture, raw
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration

GRACE = 0.2
# Hold the commit up to 2 s while acquiring; an acquisition gives up after 1 s (busy).
HELD = {"capacity": 1, "kcr_heartbeat_grace": GRACE, "kcr_heartbeat_interval": 0.2,
        "kcr_commit_hold_max": 2.0, "kcr_acquire_timeout": 1.0}


def exec_head(body: bytes) -> bytes:
    return (f"POST /exec HTTP/1.1\r\nHost: t\r\n{JSON}X-API-Key: {TEST_KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def code(text: str) -> bytes:
    return json.dumps({"code": text, "lang": "py"}).encode()


def exec_lines(logs: LogCapture) -> list[dict[str, object]]:
    return [line for line in logs.access() if line["path"] == "/exec"]


async def test_busy_while_holding_and_acquired_while_holding(tmp_path: Path, logs: LogCapture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """After the grace, with no sandbox yet: a busy answer is still a real 503, and an acquisition
    that comes then starts the settle and the commit (heartbeats, then the answer) on both paths."""
    answers: dict[bool, tuple[bytes, tuple[bytes, bytes]]] = {}
    async with server(tmp_path, **HELD) as (port, program):
        for fast in (True, False):
            with monkeypatch.context() as m:
                if not fast:
                    m.setattr(exec_fast, "is_exec", lambda method, path: False)
                holder = await raw(port, exec_head(code("forever")))
                await await_until(lambda: program.running == 1, 5, message="a run holding the only slot")
                busy = masked(await ask(port, code("sleep:0")))
                assert status_of(busy) == 503 and b"retry-after: <n>" in busy, busy
                await holder.aclose()
                await await_until(lambda: program.running == 0, 5, message="the holder's run cancelled")
                holder = await raw(port, exec_head(code("sleep:0.6")))
                await await_until(lambda: program.running == 1, 5, message="a run holding the only slot")
                answer = await ask(port, code("sleep:0.5"))  # waits ~0.6 s for the slot (past the grace), then runs
                await holder.aclose()
                answers[fast] = (busy, committed(answer))
                head, payload = committed(answer)
                assert head.startswith(b"HTTP/1.1 200 \r\ncache-control: no-store, no-transform\r\n"), answer
                assert json.loads(payload)["stdout"] == "done\n", answer
    assert answers[True] == answers[False], answers
    lines = exec_lines(logs)
    busy_lines = [line for line in lines if line["status"] == 503]
    assert len(busy_lines) == 2 and all(line["outcome"] == "busy" and "heartbeat" not in line for line in busy_lines)
    assert all(float(str(line["duration_ms"])) >= 1000 * GRACE for line in busy_lines), busy_lines
    # The two runs that waited for the slot: their acquisition came after the grace, while the
    # commit was held, and their answers were committed (heartbeats) and complete.
    waited = [line for line in lines if float(line.get("phases_ms", {}).get("acquire", 0)) > 1000 * GRACE]  # type: ignore[attr-defined]
    assert len(waited) == 2 and all(line["outcome"] == "ok" and line.get("heartbeat") for line in waited), lines


async def test_failure_behind_a_commit_and_leaving_a_commit(tmp_path: Path, logs: LogCapture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails after the commit ends as an error body behind the 200 on both paths; a
    client that leaves a committed stream cancels its run on both."""
    bodies = []
    async with server(tmp_path, **HELD) as (port, program):
        for fast in (True, False):
            with monkeypatch.context() as m:
                if not fast:
                    m.setattr(exec_fast, "is_exec", lambda method, path: False)
                head, payload = committed(await ask(port, code("fail:0.5")))
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert "Sandbox failed" in json.loads(payload)["stderr"], payload
                bodies.append((head, payload))
                stream = await raw(port, exec_head(code("forever")))
                seen = b""
                with trio.fail_after(10):
                    while seen.count(b"\r\n1\r\n \r\n") < 2:  # the head and two heartbeats
                        seen += await stream.receive_some()
                expected = program.cancelled + 1
                await stream.aclose()
                await await_until(lambda n=expected: program.cancelled == n and program.running == 0, 5,
                                  message="the committed run cancelled")
    assert bodies[0] == bodies[1], bodies
    with trio.fail_after(10):
        while len(exec_lines(logs)) < 4:
            await trio.sleep(0.01)
    lines = exec_lines(logs)
    assert [line["outcome"] for line in lines] == ["error", "client_gone"] * 2, lines
    assert all(line.get("heartbeat") for line in lines), lines
