"""Starting user processes from the sidecar's own (main) thread, and waiting for them with Trio.

Why not ``trio.lowlevel.open_process``: it runs ``Popen`` in a Trio worker thread, and Trio retires
a worker thread after 10 s idle. Linux delivers a child's parent-death signal
(``PR_SET_PDEATHSIG``, which bubblewrap sets for ``--die-with-parent``) when the *thread* that
forked it exits, not the process. Every pre-warmed interpreter was therefore SIGKILLed 10 s after
it was started while the sidecar idled (measured: 427 ``prewarm_died`` events in 33 minutes), and a
run that took it answered exit code 137.

Spawning from the thread that runs Trio ties the death signal to the sidecar's lifetime, which is
what ``--die-with-parent`` means. The cost is a blocking ``Popen`` on the event loop: with
``vfork`` (no ``preexec_fn``, no uid change in ``Popen``: ``limits.spawn_user`` uses ``setpriv``
and ``prlimit`` instead) that is a fraction of a millisecond, and the sidecar serves one run at a
time anyway.

``Child`` offers the part of ``trio.Process`` the sidecar uses: ``pid``, ``returncode``,
``stdout``/``stderr`` as Trio streams and ``await wait()`` (one waiter at a time, on a pidfd).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import trio


class Child:
    """A started process: its pipes as Trio streams and an awaitable exit."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.args = popen.args
        self.stdout = self._stream(popen.stdout)
        self.stderr = self._stream(popen.stderr)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):  # very old kernels: wait() polls instead
            self._pidfd = -1
        self._waiting = False

    @staticmethod
    def _stream(pipe: Any) -> trio.lowlevel.FdStream | None:
        if pipe is None:
            return None
        fd = os.dup(pipe.fileno())
        pipe.close()
        return trio.lowlevel.FdStream(fd)

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal) once the process has exited.

        Reads it without blocking; like ``Popen.poll`` this reaps an exited child."""
        rc = self._popen.poll()
        if rc is not None and not self._waiting:
            self._close_pidfd()
        return rc

    async def wait(self) -> int:
        """Wait until the process exits and return its status. Cancellable."""
        if self.returncode is None:
            self._waiting = True
            try:
                if self._pidfd >= 0:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    while self._popen.poll() is None:
                        await trio.sleep(0.01)
            finally:
                self._waiting = False
        rc = self._popen.wait()  # exited: returns at once (and reaps)
        self._close_pidfd()
        return rc

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def kill(self) -> None:
        self._popen.kill()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            fd, self._pidfd = self._pidfd, -1
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:  # outside Trio (garbage collection at exit)
                pass
            os.close(fd)

    def __del__(self) -> None:  # a Child dropped without wait(): do not leak the pidfd
        try:
            self._close_pidfd()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing to report to
            pass


async def open_child(argv: list[str], **popen_kwargs: Any) -> Child:
    """``Popen`` in the calling (Trio) thread; stdout and stderr as Trio streams when PIPE."""
    await trio.lowlevel.checkpoint()
    # Deliberately blocking, on this thread (see the module docstring): vfork + exec, well under 1 ms.
    return Child(subprocess.Popen(argv, **popen_kwargs))  # noqa: ASYNC220
