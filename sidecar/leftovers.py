"""What is left of a run once its program is done: which processes still run, and its output.

Split out of ``runner.py`` (which decides *when* to look and what to kill). Everything here is
synchronous and cheap, because it runs on the answer's path of every ``/execute``:

* ``group_members``: the run's processes, read from its control groups' ``cgroup.procs`` (one
  read per group) instead of walking ``/proc/<pid>/task/*/children`` from the sidecar down (two
  walks of every process and thread of the subtree, ~0.3 ms on a cold cache). A slot's groups
  hold exactly the current run (``cgroups.py``: one run per slot, every process of a run is
  killed before the next starts, the next pre-warmed interpreter is only started after the run),
  and a process enters its group before it executes anything, so nothing of the run can be
  missing; membership does not depend on who the parent is, so there is no re-parenting race
  either. A process leaves the list only once it has started exiting (it can never run user code
  again) — the same test ``sandbox.not_exiting`` applies to the listed ones.
* ``winding_down``: after a "done" report, the processes that only wind down.
* ``drain``: take what is in a pipe now, without waiting; ``Pumps``: the step's pump tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

import trio

from .prewarm import Warm


class _Capture(Protocol):
    def add(self, data: bytes | bytearray) -> bool: ...


class _State(Protocol):
    def stop(self, reason: str) -> None: ...


class Pumps:
    """A step's two output pumps, run in the runner's nursery (not one of the step's own): an
    early answer drains and closes the pipes itself and does not wait for the pumps to wind
    down (two scheduler rounds on every answer); a closed stream ends a pump wherever it is.
    ``done`` is set once both have ended (EOF, a closed stream, or ``cancel``)."""

    def __init__(self) -> None:
        self.scopes = (trio.CancelScope(), trio.CancelScope())  # one per pump (Trio's rule)
        self.left = 2
        self.done = trio.Event()

    def cancel(self) -> None:
        for scope in self.scopes:
            scope.cancel()

    def ended(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set()


def group_members(procs_files: Iterable[str]) -> set[int] | None:
    """The pids listed in ``procs_files`` (one ``cgroup.procs`` per group), or None if one of them
    cannot be read (then the caller walks the process tree instead)."""
    out: set[int] = set()
    for path in procs_files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = b""
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
        finally:
            os.close(fd)
        out.update(int(p) for p in data.split())
    return out


def winding_down(warm: Warm | None) -> frozenset[int]:
    """After a "done" report: the processes of a pre-warmed run that only wind down, i.e.
    bubblewrap's monitor and reaper and, when the kernel says the report came from it, the
    interpreter itself (its bootstrap exits right after reporting). Anything else the run left
    (children, a forked copy of the interpreter that reported instead) still counts as running."""
    if warm is None:
        return frozenset()
    out = set(warm.wrapper_pids)
    if warm.reporter is not None and warm.reporter == warm.limit_pid:
        out.add(warm.reporter)
    return frozenset(out)


def chain(top: int, bottom: int) -> set[int]:
    """The pids from ``top`` down to ``bottom`` (exclusive), following ``bottom``'s parents."""
    out: set[int] = set()
    current = bottom
    for _ in range(8):
        with open(f"/proc/{current}/stat", "rb") as fh:
            current = int(fh.read().rsplit(b")", 1)[1].split()[1])
        out.add(current)
        if current == top:
            return out
    return set()


def drain(stream: trio.lowlevel.FdStream | None, cap: _Capture, state: _State) -> None:
    """Take what is in a pipe now, without waiting (its fd is non-blocking)."""
    if stream is None:
        return
    while True:
        try:
            data = os.read(stream.fileno(), 65536)
        except OSError:  # BlockingIOError: empty for now
            return
        if not data:
            return
        if cap.add(data):
            state.stop("output")
