"""Local sidecars die with their server, however the server dies.

Before: sidecars run in their own session (so a run's signals never reach the server), and nothing
tied them to the server's life: every SIGKILLed server (a test that runs ``kill -9 $PPID`` in user
code, an OOM kill, a crash) left its warm sidecars, bubblewrap sandboxes and interpreters running
for good. Now each sidecar watches a pipe whose write end only the server holds
(``sidecar.server.watch_lifeline``): EOF means the server is gone, and the sidecar shuts down and
kills everything of its runs.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.support.server import TEST_KEY, server_process, wait_until

pytestmark = pytest.mark.integration


def _table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} of every process on the host."""
    out: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    rest = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            out[int(name)] = (int(rest[1]), rest[0].decode())
    return out


def _below(root: int) -> set[int]:
    table = _table()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _s) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _alive(pids: set[int]) -> set[int]:
    table = _table()
    return {p for p in pids if p in table and table[p][1] not in ("Z", "X")}


def test_sidecars_and_their_sandboxes_exit_when_the_server_is_sigkilled() -> None:
    with server_process({"POD_POOL_PY": "2", "POD_POOL_BASH": "1"}) as server:
        # One run first: a used-and-reset sidecar must die too, not only never-used ones.
        resp = httpx.post(server.url + "/exec", headers={"X-API-Key": TEST_KEY}, timeout=60,
                          json={"lang": "py", "code": "print(6 * 7)"})
        assert resp.status_code == 200 and resp.json()["stdout"] == "42\n", resp.text

        def sidecars() -> set[int]:
            found = {p for p in _below(server.pid) if " -m sidecar " in _cmdline(p)}
            return found if len(found) >= 3 else set()

        started = wait_until(sidecars, 60, interval=0.1, message="the warm sidecars")
        # Everything below them: bubblewrap, its namespace's reaper, the warm interpreters.
        everything = set(started)
        for pid in started:
            everything |= _below(pid)
        assert any("bwrap" in _cmdline(p) for p in everything), "expected warm sandboxes to be running"

        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        wait_until(lambda: not _alive(everything), 30, interval=0.1,
                   message=f"the dead server's sidecars and sandboxes to exit (alive: {_alive(everything)})")
