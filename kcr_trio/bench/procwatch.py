"""Watch this machine's processes for benchmark markers, and time their deaths exactly.

Only for targets on this machine (loopback URLs): the disconnect storm's programs carry a marker
token in their command line (``kcrbench-<run>-<i>``). A scan of ``/proc/*/cmdline`` (in a worker
thread, every ``interval`` s) finds each one's PID; the PID is then held by a *pidfd*, which becomes
readable the instant the process exits — so the time of death is an event, not a poll, and a PID
reused later cannot be mistaken for it. Processes in a sandbox's PID namespace are visible from the
host's ``/proc`` with their host PIDs, so bubblewrap does not hide them.

Cancellation: ``run`` scans until its scope is cancelled; every pidfd is closed in ``finally``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import trio


@dataclass
class Seen:
    token: str
    pid: int
    first_seen: float  # trio.current_time()
    exited_at: float | None = None


def scan(pattern: re.Pattern[bytes], known: set[int]) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in known:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read(4096)
        except OSError:
            continue
        m = pattern.search(cmdline)
        if m:
            found.append((pid, m.group(0).decode()))
    return found


def available() -> bool:
    return hasattr(os, "pidfd_open") and os.path.isdir("/proc/self")


class ProcWatch:
    def __init__(self, run_id: str, interval: float = 0.05) -> None:
        self.pattern = re.compile(rb"kcrbench-" + re.escape(run_id.encode()) + rb"-\d+")
        self.interval = interval
        self.seen: dict[str, Seen] = {}
        self._pids: set[int] = set()

    async def _await_exit(self, seen: Seen, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
            seen.exited_at = trio.current_time()
        finally:
            os.close(fd)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for pid, token in await trio.to_thread.run_sync(scan, self.pattern, set(self._pids)):
                    self._pids.add(pid)
                    if token in self.seen:  # a child of the marked process: the first PID wins
                        continue
                    seen = self.seen[token] = Seen(token, pid, trio.current_time())
                    try:
                        fd = os.pidfd_open(pid)
                    except ProcessLookupError:
                        seen.exited_at = trio.current_time()  # gone between scan and open
                        continue
                    nursery.start_soon(self._await_exit, seen, fd)
                await trio.sleep(self.interval)
