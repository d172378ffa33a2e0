"""The program file: written for each run, never through anything a previous run planted there.

Why a module of its own: the file is on every run's critical path, and the cheapest safe way to
put it in place depends on the state of the working directory.

* **A fresh working directory** (after ``/reset``, the default between runs) has no file of that
  name. Creating one there costs 120-190 us on ext4 (a new inode, allocated through the journal),
  measured on this project's machines with a 2 ms pause before each try, as a run sees it. So a
  pre-warmed run's file is created beforehand, off the answer's path, when its interpreter is
  started (:func:`stage`, in the interpreter's private temp dir, which lies on the same
  filesystem), and at the run it is written and *renamed* into the working directory: 27-32 us.
  Nothing of the run exists before that rename, and the file is checked as if it were foreign
  (a regular file with one link, ours, empty) before it is written.
* **Otherwise** the previous run's file is rewritten in place: on ext4 about 10 us, against
  150 us for unlink + create. In place is only taken for a plain file we would have created
  ourselves: opened without following a symlink, without blocking on a FIFO, not truncated before
  ``fstat`` shows one link (a hard link to another file would otherwise be overwritten) and the
  run uid as owner. Anything else is unlinked and the file created exclusively.

Any failure of the staged way (another filesystem, a file that is not what we made) falls back to
the general way: the staged file then stays in the temp dir and goes with it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from .limits import Identity
from .prewarm import remove_tree

STAGED_NAME = ".program"  # in a pre-warmed interpreter's private temp dir (``/run/kcr`` inside)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def stage(tmp: str, identity: Identity) -> str | None:
    """Create the next run's empty program file in ``tmp`` (owned as the run's files are); its
    path, or None if it cannot be made (the run then creates the file in place)."""
    path = os.path.join(tmp, STAGED_NAME)
    try:
        fd = os.open(path, _CREATE, 0o644)
    except OSError:
        return None
    try:
        if identity.switching:
            os.fchown(fd, identity.uid, identity.gid)  # type: ignore[arg-type]
    except OSError:
        os.close(fd)
        _unlink(path)
        return None
    os.close(fd)
    return path


def write(working_dir: str, name: str, code: str, identity: Identity, staged: str | None = None,
          log: Callable[..., None] | None = None) -> None:
    """Put ``code`` at ``working_dir/name``, by the staged file when there is one and the name is
    free, else in place or created exclusively (module docstring)."""
    data = code.encode("utf-8", "surrogatepass")
    path = os.path.join(working_dir, name)
    owner = identity.uid if identity.uid is not None else os.geteuid()
    if staged is not None and _place_staged(data, staged, path, owner):
        return
    st: os.stat_result | None = None
    try:  # a fresh working directory (after /reset) has no file of that name: create it
        fd = os.open(path, _CREATE, 0o644)
    except FileExistsError:
        fd = -1
    if fd < 0:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            if not _ours(st, owner):
                os.close(fd)
                fd = -1
            elif stat.S_IMODE(st.st_mode) != 0o644:
                os.fchmod(fd, 0o644)
        except OSError:  # a symlink (ELOOP), a FIFO without reader (ENXIO), a directory...
            if fd >= 0:
                os.close(fd)
            fd = -1
    if fd < 0:
        st = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a run made a directory of that name: the name is ours
            remove_tree(path)
            if log is not None:
                log("program_path_reclaimed", path=name, was="directory")
        fd = os.open(path, _CREATE, 0o644)
    if st is None and identity.switching:
        os.fchown(fd, identity.uid, identity.gid)  # type: ignore[arg-type]
    try:
        _write_all(fd, data)
        if st is not None and st.st_size > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _place_staged(data: bytes, staged: str, path: str, owner: int) -> bool:
    """Write the staged file and rename it to ``path``; False (nothing at ``path`` changed) if the
    name is taken or the staged file is not exactly the empty file :func:`stage` made."""
    try:
        os.lstat(path)
        return False  # an upload or a kept file has the name: the general way decides
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not (_ours(st, owner) and st.st_size == 0):
            return False
        _write_all(fd, data)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rename(staged, path)  # another filesystem (EXDEV), ...: the general way
    except OSError:
        return False
    return True


def _ours(st: os.stat_result, owner: int) -> bool:
    """A plain file we would have made: regular, one link (no hard link to another file), the
    run's owner."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == owner


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
