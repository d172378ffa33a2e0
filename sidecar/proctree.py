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
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
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


def _children(pid: int) -> list[int] | None:
    """Direct children from ``/proc/<pid>/task/*/children`` (None if the kernel lacks the file)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                out += [int(x) for x in fh.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread just ended
            return None
        except OSError:
            continue
    return out


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (not ``root`` itself), zombies included; may include some that
    have just ended (callers check liveness anyway).

    Walks ``/proc/<pid>/task/*/children``, which costs O(tree) instead of O(all processes);
    falls back to a full ``/proc`` scan on kernels without that file.

    One walk is not enough. When a process exits, the kernel moves its children up to the
    subreaper (the sidecar); a walk reads the sidecar's list before the exiting parent's, so if
    the move falls between the two reads those children are in neither, and a sweep would call a
    tree with live processes in it empty. A walk that starts after another has finished sees them
    where they landed, so walks repeat until one finds nothing new (one extra walk when nothing
    moves; none when the tree is empty, since a parent is listed until its children have moved).
    """
    found = _walk(root)
    while found:
        again = _walk(root)
        if again <= found:
            break
        found |= again
    return found


def _walk(root: int) -> set[int]:
    found: set[int] = set()
    stack = [root]
    while stack:
        kids = _children(stack.pop())
        if kids is None:
            return _descendants_by_scan(root)
        for child in kids:
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _descendants_by_scan(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _pgrp) in process_table().items():
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


# setresuid(2) numbers, for the raw syscall that changes only the calling thread's credentials.
_SYS_SETRESUID = {"x86_64": 117, "aarch64": 147}.get(os.uname().machine)


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _kill_uid_in_this_thread(uid: int) -> bool:
    """``kill(-1, SIGKILL)`` as ``uid`` from the calling thread alone; False if not possible here.

    The raw ``setresuid`` system call changes the credentials of the calling thread only (the C
    library's wrapper would change every thread of the process): this thread becomes ``uid`` with
    root kept as its saved uid, signals, and returns to root. Why not fork a child that becomes
    ``uid``: forking the sidecar was a fifth of its CPU per run (page tables of a ~40 MB process).
    ``kill(-1)`` never reaches the calling process, and as ``uid`` only processes whose real or saved
    uid is ``uid`` (our other processes are root, other sandboxes have other uids). For the
    microseconds in between, a process of ``uid`` could signal this thread; sandboxed runs cannot
    see it from their PID namespace, and an unsandboxed one could at most end its own sidecar."""
    libc = _libc()
    if _SYS_SETRESUID is None or libc is None:
        return False
    if libc.syscall(_SYS_SETRESUID, uid, uid, 0) != 0:
        return False
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:  # ESRCH: nothing of that uid is left
        pass
    finally:
        if libc.syscall(_SYS_SETRESUID, 0, 0, 0) != 0:  # cannot happen with a saved uid of 0
            raise RuntimeError(f"could not return to root after the uid sweep: errno {ctypes.get_errno()}")
    return True


def kill_uid(uid: int, gid: int) -> None:
    """Send SIGKILL to every process of ``uid``, as ``uid`` (from this thread, else from a
    short-lived child that becomes ``uid``).

    Only safe when ``uid`` belongs to this sandbox alone. ``kill(-1)`` is atomic in the kernel, so
    even a fork bomb of that uid cannot outrun it. Requires root; a no-op otherwise.
    """
    if os.geteuid() != 0 or uid == 0:
        return
    if _kill_uid_in_this_thread(uid):
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
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # reaped meanwhile by reap_orphans (it runs on the Trio thread)
        pass


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
    SIGKILL sweeps until no live descendant is left or ``deadline`` passes. Zombies are not "left":
    the caller reaps them (see ``reap_orphans``). Blocking, but bounded by ``deadline``; the SIGTERM
    grace is the only sleep and ends early when everything is already gone.
    """
    keep = set(keep)
    start = time.monotonic()

    def live() -> dict[int, int]:
        out = {}
        for pid in descendants(root) - keep:
            info = _stat(pid)
            if info is not None and info[0] not in ("Z", "X"):
                out[pid] = info[2]
        return out

    victims = live()
    if not victims and uid is None:
        return []
    groups = {g for g in list(pgids) + list(victims.values()) if g > 1 and g != os.getpgrp()}
    groups -= keep
    signalled = set(victims)
    _signal_all(victims, groups, signal.SIGTERM)
    while victims and time.monotonic() - start < grace and any(alive(p) for p in victims):
        time.sleep(0.002)
    if uid is not None:
        kill_uid(*uid)
    while True:
        victims = live()
        if not victims:
            break
        signalled |= set(victims)
        groups |= {g for g in victims.values() if g > 1 and g != os.getpgrp() and g not in keep}
        _signal_all(victims, groups, signal.SIGKILL)
        if time.monotonic() - start > deadline:
            break
        time.sleep(0.001)
    return sorted(signalled)


def reap_orphans(tracked: Iterable[int]) -> int:
    """Reap zombie children adopted as subreaper; never touches ``tracked`` (Trio waits on those)."""
    tracked = set(tracked)
    me = os.getpid()
    reaped = 0
    for pid in _children(me) or ():
        info = _stat(pid)
        if info is not None and pid not in tracked and info[0] in ("Z", "X"):
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
            except ChildProcessError:
                pass
    return reaped


def count_tasks_of_uid(uid: int) -> int:
    """Threads owned by ``uid``: what RLIMIT_NPROC compares against (owner of ``/proc/<pid>``)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                total += len(os.listdir(f"/proc/{name}/task"))
        except OSError:
            continue
    return total
