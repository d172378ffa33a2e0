"""The working directory: listing, snapshots for generated-file detection, safe names and opens.

Generated files are found by comparing ``(size, mtime_ns, inode)`` of every top-level regular file
before and after the run: created or modified files are reported, untouched inputs are not, and a
file rewritten via rename (new inode) counts as modified. Symlinks are never listed or served.

Downloads open the name relative to a directory fd with ``O_NOFOLLOW``, after refusing anything
that is not one plain path component, so neither ``..`` nor a symlink planted by user code can reach
outside the working directory.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass

Snapshot = dict[str, tuple[int, int, int]]

_EXTRA_TYPES = {
    ".csv": "text/csv",
    ".md": "text/markdown",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".parquet": "application/vnd.apache.parquet",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def mime_type(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if ext in _EXTRA_TYPES:
        return _EXTRA_TYPES[ext]
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def plain_name(name: str) -> bool:
    """One visible-or-hidden path component, never ``.``/``..``, no separators or NULs."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 255
    )


def upload_name(raw: str | None) -> str | None:
    """The basename an upload is stored under, or None to skip it (empty or a dot-file)."""
    if not raw:
        return None
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base or base.startswith(".") or not plain_name(base):
        return None
    return base


def snapshot(directory: str) -> Snapshot:
    """``{name: (size, mtime_ns, inode)}`` of the top-level regular files (symlinks skipped)."""
    snap: Snapshot = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    snap[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        pass
    return snap


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    size: int

    def as_json(self, with_path: bool = True) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "size": self.size, "mime_type": mime_type(self.name)}
        if with_path:
            out["path"] = self.name
        return out


def changed(before: Snapshot, after: Snapshot, exclude: frozenset[str]) -> list[Entry]:
    """Files created or modified between two snapshots, by name, minus ``exclude``."""
    return [
        Entry(name, info[0])
        for name, info in sorted(after.items())
        if name not in exclude and before.get(name) != info
    ]


def listing(directory: str) -> list[Entry]:
    return [Entry(n, info[0]) for n, info in sorted(snapshot(directory).items())]


def usage(paths: list[str]) -> tuple[int, int]:
    """``(bytes, entries)`` below ``paths`` (allocated blocks, so sparse files cannot cheat)."""
    total = entries = 0
    stack = list(paths)
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += max(st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue
    return total, entries


def open_regular(directory: str, name: str) -> tuple[int, int] | None:
    """``(fd, size)`` of a regular top-level file, or None. Never follows a symlink."""
    if not plain_name(name):
        return None
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd, st.st_size


def delete(directory: str, name: str) -> bool:
    if not plain_name(name):
        return False
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return False
        os.unlink(name, dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(dfd)
