"""Finding and killing every process a run left behind, via ``/proc``.

Why not just ``killpg``: user code can leave its process group (``setsid()``, double fork, a shell's
``setsid cmd &``), and such a process would survive a group kill. The sidecar therefore makes itself a
*child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): an orphaned descendant is re-parented to the
sidecar instead of init, so "everything the run started" is exactly "every descendant of the sidecar
except the processes the sidecar still wants". Killing walks that tree from ``/proc`` until it is
empty. When the run has a uid of its own (``--run-uid-exclusive``), a helper that becomes that uid
sends ``kill(-1, SIGKILL)`` as a final, atomic sweep.

All functions here are synchronous and cheap (one ``/proc`` scan is a few hundred microseconds to a
few milliseconds); callers in Trio code use them between checkpoints.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ≥ 3.4). Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, pgrp)`` of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, ppid, pgrp)}`` for every visible process."""
    table: dict[int, tuple[str, int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                table[int(name)] = info
    return table


def descendants(root: int, table: dict[int, tuple[str, int, int]] | None = None) -> set[int]:
    """Every process below ``root`` (not ``root`` itself)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _pgrp) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    info = _stat(pid)
    return info is not None and info[0] not in ("Z", "X")


def _signal_all(pids: Iterable[int], pgids: Iterable[int], sig: int) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill_uid(uid: int, gid: int) -> None:
    """Send SIGKILL to every process of ``uid`` from a short-lived child that becomes ``uid``.

    Only safe when ``uid`` belongs to this sandbox alone. ``kill(-1)`` is atomic in the kernel, so
    even a fork bomb of that uid cannot outrun it. Requires root; a no-op otherwise.
    """
    if os.geteuid() != 0 or uid == 0:
        return
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, just the syscalls
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def kill_tree(
    root: int,
    *,
    keep: Iterable[int] = (),
    pgids: Iterable[int] = (),
    grace: float = 0.02,
    deadline: float = 1.0,
    uid: tuple[int, int] | None = None,
) -> list[int]:
    """Kill every descendant of ``root`` except ``keep``; returns the pids that were signalled.

    SIGTERM first (so well-behaved programs can flush), SIGKILL after ``grace`` seconds, then repeated
    SIGKILL sweeps until no descendant is left or ``deadline`` passes. Zombies are not "left": the
    caller reaps them (see ``reap_orphans``). Blocking, but bounded by ``deadline`` (the SIGTERM
    grace is the only sleep; it ends early when everything is already gone).
    """
    keep = set(keep)
    pgids = list(pgids)
    start = time.monotonic()
    table = process_table()
    victims = descendants(root, table) - keep
    pgids += [table[p][2] for p in victims if p in table and table[p][2] not in keep]
    pgids = [g for g in set(pgids) if g > 1 and g != os.getpgrp()]
    signalled = set(victims)
    _signal_all(victims, pgids, signal.SIGTERM)
    while time.monotonic() - start < grace and any(alive(p) for p in victims):
        time.sleep(0.002)
    if uid is not None:
        kill_uid(*uid)
    while True:
        table = process_table()
        victims = {p for p in descendants(root, table) - keep if table[p][0] not in ("Z", "X")}
        if not victims and not any(_group_alive(g, table) for g in pgids):
            break
        signalled |= victims
        _signal_all(victims, pgids, signal.SIGKILL)
        if time.monotonic() - start > deadline:
            break
        time.sleep(0.001)
    return sorted(signalled)


def _group_alive(pgid: int, table: dict[int, tuple[str, int, int]]) -> bool:
    return any(g == pgid and s not in ("Z", "X") for s, _pp, g in table.values())


def reap_orphans(tracked: Iterable[int]) -> int:
    """Reap zombie children adopted as subreaper; never touches ``tracked`` (Trio waits on those)."""
    tracked = set(tracked)
    me = os.getpid()
    reaped = 0
    for pid, (state, ppid, _g) in process_table().items():
        if ppid == me and pid not in tracked and state in ("Z", "X"):
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
            except ChildProcessError:
                pass
    return reaped


def count_tasks_of_uid(uid: int) -> int:
    """Threads owned (real uid) by ``uid``: what RLIMIT_NPROC compares against."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                ruid = threads = None
                for line in fh:
                    if line.startswith(b"Uid:"):
                        ruid = int(line.split()[1])
                    elif line.startswith(b"Threads:"):
                        threads = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
        if ruid == uid and threads:
            total += threads
    return total
