"""Pre-warmed interpreters: start-up paid while idle, one run each.

A ``Warm`` process is a user process like any other (same session, limits, uid, environment and
private temp dir as a cold run) that has already started its interpreter and waits on fd 3, one end
of a socketpair. Handshake: the child writes ``R`` when ready; the sidecar writes the source file and
sends ``G``; the child runs the file as ``<interpreter> <file>`` would. The socket stays open until
the process is reaped, so neither side ever writes into a closed pipe.

Each warm process serves exactly one run (no state can leak between users), and a fresh one is
started after every run.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile

import trio

from .limits import Identity
from .spawn import Child


def make_private_tmp(root: str, identity: Identity) -> str:
    """A fresh ``<root>/kcr-run-*`` with ``home`` and ``tmp`` inside, owned by the run's uid."""
    path = tempfile.mkdtemp(prefix="kcr-run-", dir=root)
    for sub in ("home", "tmp"):
        os.mkdir(os.path.join(path, sub), 0o700)
    if identity.switching:
        for p in (path, os.path.join(path, "home"), os.path.join(path, "tmp")):
            os.chown(p, identity.uid, identity.gid)  # type: ignore[arg-type]
    return path


def remove_tree(path: str) -> None:
    """``rm -rf`` that also copes with read-only dirs (Go's module cache makes them).

    On a permission error it makes the entry's directory writable and retries, but only for
    directories *inside* ``path``: the tree's own parent (``/tmp``, the data directory) is never
    touched, whatever fails.
    """
    root = os.path.abspath(path)

    def fix(func, p, _exc):  # type: ignore[no-untyped-def]
        try:
            parent = os.path.dirname(os.path.abspath(p))
            if parent == root or parent.startswith(root + os.sep):
                os.chmod(parent, 0o700)
            if os.path.abspath(p) != root:
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(root, onerror=fix)


_CREDS_SPACE = socket.CMSG_SPACE(struct.calcsize("3i"))  # one SCM_CREDENTIALS (pid, uid, gid)


class Warm:
    """One started interpreter waiting for its program."""

    def __init__(self, process: Child, sock: trio.socket.SocketType, tmp: str) -> None:
        self.process = process
        self.sock = sock
        self.tmp = tmp
        self.staged: str | None = None  # the run's program file, made beforehand (program_file.stage)
        self.ready = trio.Event()
        self.failed = False
        self.used = False
        # The watcher (handshake, then the process's exit) runs in this scope and is the process's
        # only waiter (Trio allows one): a run waits for ``exited``; discarding an unused process
        # cancels the watcher and waits for ``idle_done`` before waiting for the process itself.
        self.idle_scope = trio.CancelScope()
        self.idle_done = trio.Event()
        self.exited = trio.Event()  # set by the watcher, the only task that waits for the process
        # The run waits for ``finished``: the program's reported status (``status``) or the
        # process's exit, whichever comes first. Both waits are started by the watcher while the
        # interpreter is idle, so a run pays for no task of its own.
        self.finished = trio.Event()
        self.status: int | None = None
        # Measured while idle (``Runner._measure_idle``): the pid whose rlimits bind the program
        # (None: unknown, leave them) and the CPU seconds its start-up used.
        self.limit_pid: int | None = None
        self.cpu_used = 0
        # In a sandbox: bubblewrap's own processes above the interpreter (its monitor and its PID
        # namespace's reaper), found while idle. After a "done" report they only wind down.
        self.wrapper_pids: set[int] = set()
        # The pid (sidecar's namespace) that sent the "done" report, from the kernel's credentials
        # on the socket (SO_PASSCRED): only a report of the interpreter itself says that the
        # interpreter is done (a forked child that ends through the bootstrap reports too).
        self.reporter: int | None = None

    async def stop_watching(self) -> None:
        self.idle_scope.cancel()
        await self.idle_done.wait()

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        parent, child = socket.socketpair()
        # The kernel attaches the sender's pid to every message the parent end receives: set
        # before the child exists, so no message can arrive without it.
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        child.set_inheritable(True)
        return parent, child

    async def wait_handshake(self) -> None:
        """Wait for the child's ``R``; a child that dies first marks the warm process failed."""
        try:
            data = await self.sock.recv(1)
        except (OSError, trio.ClosedResourceError):  # closed by a run that used us meanwhile
            data = b"R" if self.used else b""
        if data != b"R":
            self.failed = True
        self.ready.set()

    async def go(self) -> None:
        """Let the child run the source file (already written by the caller)."""
        self.used = True
        try:
            # One byte into a socket nobody else writes to: it fits at once. Written directly,
            # the interpreter starts without waiting for a scheduler round trip of ours.
            os.write(self.sock.fileno(), b"G")
        except BlockingIOError:
            try:
                await self.sock.send(b"G")
            except OSError:
                self.failed = True
        except OSError:
            self.failed = True

    async def take_report(self) -> None:
        """Wait for the program's "done" report; a socket that closes without one changes
        nothing (then the process's exit sets ``finished``)."""
        status = await self.wait_done()
        if status is not None:
            self.status = status
            self.finished.set()

    async def wait_done(self) -> int | None:
        """The program's exit status as the interpreter reports it just before exiting (the
        pre-warmed Python, Node and bash bootstraps send ``D`` + status once their output streams
        are closed), or ``None`` when the socket closes without a report (``os._exit`` in user
        code, a replaced EXIT trap, an uncaught Node exception, a signal): then only the
        process's exit tells."""
        data = b""
        senders: set[int] = set()
        while len(data) < 2:
            try:
                chunk, anc, _flags, _addr = await self.sock.recvmsg(2 - len(data), _CREDS_SPACE)
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
            senders |= {struct.unpack("3i", c[:12])[0] for lvl, kind, c in anc
                        if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(c) >= 12}
        if data[:1] != b"D":
            return None
        self.reporter = senders.pop() if len(senders) == 1 else None
        return data[1]

    def close(self) -> None:
        self.sock.close()
