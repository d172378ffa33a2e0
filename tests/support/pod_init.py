"""A tiny "container init" for the Kubernetes emulator's pods.

Usage: ``python pod_init.py GRACE_SECONDS -- ARGV...``

Why it exists: a real container dies as a whole — when its main process exits, or the kubelet
stops it, every process inside goes with it. A plain child process does not: programs the sidecar
started in their own process groups would survive it. This wrapper makes itself a *child
subreaper* (``PR_SET_CHILD_SUBREAPER``), so every orphaned descendant is re-parented to it, and
then behaves like the container runtime:

* it runs ``ARGV`` (the sidecar) as its main process;
* on SIGTERM it forwards SIGTERM to the main process and gives it ``GRACE_SECONDS`` to exit
  (SIGUSR1 means "grace period 0": kill at once, as a force delete does);
* once the main process has exited (by itself, killed with ``kill -9`` by a test, or after the
  grace period, when it is SIGKILLed), every remaining descendant is SIGKILLed and reaped;
* it exits with the main process's exit code, or ``128 + signal`` if a signal killed it — the
  number Kubernetes reports as the container's ``exitCode``.

Linux only (prctl). Uses only the standard library so it starts fast.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` found by scanning ``/proc`` (ppid is field 4 of ``stat``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _kill_all_descendants(me: int) -> None:
    """SIGKILL and reap everything below us until nothing is left (orphans re-parent to us)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        # Reap what already exited so zombies do not count as live children.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        stack = _children(me)
        if not stack:
            return
        seen = set()
        while stack:  # kill grandchildren too: they become our children when their parent dies
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            stack.extend(_children(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    grace = float(argv[0])
    cmd = argv[argv.index("--") + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = os.getpid()

    wanted = {signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)

    kill_at: float | None = None
    status = None
    while status is None:
        timeout = 1.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
        info = signal.sigtimedwait(wanted, timeout)
        if info is not None and info.si_signo == signal.SIGUSR1:
            kill_at = time.monotonic()
        elif info is not None and info.si_signo == signal.SIGTERM and kill_at is None:
            kill_at = time.monotonic() + grace
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # Reap anything that exited (the main process or re-parented orphans).
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, st = child, 0
            if pid == 0:
                break
            if pid == child:
                status = st
                break
        if status is None and kill_at is not None and time.monotonic() >= kill_at:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            kill_at = time.monotonic() + 5.0
    _kill_all_descendants(me)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
