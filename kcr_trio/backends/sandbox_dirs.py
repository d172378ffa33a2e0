"""Each server's sandbox directories live in one directory of its own, held by a lock while the
server or any of its sidecars lives; the next server removes what belongs to dead ones.

Why: a sidecar removes its own temp root, and a server removes a sidecar's directory when it
destroys it, but a server that is SIGKILLed (OOM killer, ``kill -9``, a crash) removes nothing, and
its ``<sandboxes>/<lang>-<hex>`` directories (working dirs with user files, run temp dirs) stayed
on disk for good. Several servers may share one data directory (two replicas, parallel test runs,
the ``/tmp`` fallback of ``local_settings.sandbox_root``), so "not mine" is not "dead".

How a directory is known to be dead: the server holds an exclusive ``flock`` on its directory
(``srv-<hex>``) from before it is visible under that name until it exits, and every sidecar
inherits the locked descriptor. The kernel releases the lock only when the last holder is gone, so
a lock another process can take means the server and all its sidecars have exited; no pid is
compared, so a reused pid cannot keep a dead directory or condemn a live one. The directory is
created under a name the sweep ignores (``.new-<hex>``), locked, then renamed: a sweep never sees
a server's directory unlocked. The sweep removes a dead directory while holding its lock, so two
servers starting together cannot both act on it. Directories of older versions (``<lang>-<hex>``
directly under ``sandboxes``) carry no owner and are left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sidecar.host import remove_tree

log = logging.getLogger("kcr_trio.local_executor")

PREFIX = "srv-"
_STAGING = ".new-"


@dataclass
class ServerDir:
    """This server's directory under ``sandboxes`` and the locked descriptor that marks it live
    (passed to every sidecar, so the lock outlives the server until its sidecars exit too)."""

    path: Path
    lock_fd: int

    def close(self) -> None:
        """Release this server's hold (its sidecars may still hold theirs until they exit)."""
        fd, self.lock_fd = self.lock_fd, -1
        if fd >= 0:
            os.close(fd)


def _lock(path: Path) -> int | None:
    """An open descriptor of directory ``path`` holding its exclusive lock, or None if another
    process holds it (or the directory is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def claim(sandboxes: Path) -> ServerDir:
    """Create and lock this server's directory (mode 0711: the run uids traverse it). Blocking."""
    for _ in range(100):
        token = secrets.token_hex(8)
        staging = sandboxes / f"{_STAGING}{token}"
        staging.mkdir(mode=0o711)
        os.chmod(staging, 0o711)
        fd = _lock(staging)
        if fd is None:  # cannot happen unless someone else touched our fresh name: take another
            continue
        final = sandboxes / f"{PREFIX}{token}"
        os.rename(staging, final)
        return ServerDir(final, fd)
    raise OSError(f"could not create a locked sandbox directory in {sandboxes}")


def sweep_dead(sandboxes: Path) -> list[Path]:
    """Remove every ``srv-*`` directory whose lock nobody holds (its server and sidecars are gone)
    and return them. Live servers' directories (locked) are never touched. Blocking."""
    removed: list[Path] = []
    try:
        entries = list(sandboxes.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PREFIX) or entry.is_symlink() or not entry.is_dir():
            continue
        fd = _lock(entry)
        if fd is None:
            continue
        try:
            remove_tree(str(entry))
        except OSError as exc:
            log.warning("could not remove a dead server's sandboxes %s: %s", entry, exc)
        finally:
            os.close(fd)
        removed.append(entry)
    if removed:
        log.info("removed %d dead server sandbox director%s", len(removed), "y" if len(removed) == 1 else "ies")
    return removed
