"""The working directory: listing, snapshots for generated-file detection, safe names and opens.

Generated files are found by comparing ``(size, mtime_ns, inode)`` of every regular file below the
working directory (subdirectories included, by relative path) before and after the run: created or modified files are reported, untouched inputs are not, and a
file rewritten via rename (new inode) counts as modified. Symlinks are never listed or served.

Downloads open each path component relative to its parent's fd with ``O_NOFOLLOW``, after refusing
anything that is not a path of plain components, so neither ``..`` nor a symlink planted by user
code can reach outside the working directory.
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


# Walking the tree is bounded: the disk quota bounds what a run can create, this bounds the work.
MAX_WALK_ENTRIES = 20_000
MAX_DEPTH = 16
# Directories whose content is an interpreter's by-product, never the user's output.
SKIP_DIRS = frozenset({"__pycache__"})


def snapshot(directory: str) -> Snapshot:
    """``{relative path: (size, mtime_ns, inode)}`` of the regular files below ``directory``.

    Files in subdirectories are keyed by their ``/``-separated path, so a program that writes
    ``charts/plot.png`` gets it back under that name (LibreChat takes ``name`` as the path under
    ``/mnt/data``). Symlinks are never followed or listed.
    """
    snap: Snapshot = {}
    stack: list[tuple[str, str, int]] = [(directory, "", 0)]
    seen = 0
    while stack and seen < MAX_WALK_ENTRIES:
        path, prefix, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                for entry in it:
                    seen += 1
                    if seen > MAX_WALK_ENTRIES:
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        snap[prefix + entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
                    elif stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH and entry.name not in SKIP_DIRS:
                        stack.append((entry.path, prefix + entry.name + "/", depth + 1))
        except OSError:
            continue
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


def relative_parts(name: str) -> list[str] | None:
    """The components of a relative path below the working directory, or None if it is not one."""
    parts = name.split("/")
    if len(parts) > MAX_DEPTH + 1 or not all(plain_name(part) for part in parts):
        return None
    return parts


def open_regular(directory: str, name: str) -> tuple[int, int] | None:
    """``(fd, size)`` of a regular file at ``name`` (a relative path), or None.

    Every component is opened relative to its parent's fd with ``O_NOFOLLOW``, so neither ``..``
    nor a symlink planted by user code (at any level) can lead outside the working directory.
    """
    parts = relative_parts(name)
    if parts is None:
        return None
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                return None
            os.close(dfd)
            dfd = inner
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
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
