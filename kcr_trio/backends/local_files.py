"""File bytes on the local disk: the embedded default and the S3 store's twin.

Objects live at ``<root>/<object key>``. Writes go to a temporary file in ``<root>/.partial/`` and are
renamed into place only when complete (an upload's spool file, ``interfaces.Spooled``, is
hard-linked there instead of copied when it is on the same filesystem), so a reader never sees half a file and a cancelled upload
leaves nothing behind (the ``finally`` removes the partial file). Disk I/O runs in Trio's worker
threads in large chunks; nothing holds a whole file in memory.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from kcr_trio.core.errors import NotFound, TooLarge, Unavailable
from kcr_trio.core.ids import new_id
from kcr_trio.core.interfaces import Body, Spooled

CHUNK = 256 * 1024
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)
_KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$")


class LocalFileStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._partial = self.root / ".partial"
        self._partial.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are built by the core from ids we validated, but check anyway: a key can never leave
        # the root (no "..", no absolute paths, no dot-leading components).
        if not _KEY_RE.match(key) or ".." in key:
            raise NotFound("File not found")
        return self.root / key

    async def put(self, key: str, chunks: Body, *, content_type: str, max_bytes: int | None = None) -> int:
        target = self._path(key)
        tmp = self._partial / f"{new_id()}.part"
        size = 0
        try:
            if isinstance(chunks, Spooled):
                if max_bytes is not None and chunks.size > max_bytes:
                    raise TooLarge(f"File exceeds maximum size of {max_bytes // (1024 * 1024)}MB")
                await trio.to_thread.run_sync(_link_or_copy, chunks, tmp)
                await trio.to_thread.run_sync(_install, tmp, target)
                return chunks.size
            async with await trio.open_file(tmp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"File exceeds maximum size of {max_bytes // (1024 * 1024)}MB")
                    await out.write(chunk)
            await trio.to_thread.run_sync(_install, tmp, target)
        except OSError as exc:
            raise Unavailable(f"File store unavailable: {exc.strerror or exc}") from exc
        finally:
            # Shielded: a cancelled upload must not leave its partial file behind.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quiet, tmp)
        return size

    @asynccontextmanager
    async def open(self, key: str) -> AsyncIterator[AsyncIterator[bytes]]:
        path = self._path(key)
        try:
            handle = await trio.open_file(path, "rb")
        except FileNotFoundError:
            raise NotFound("File content not found") from None
        except OSError as exc:
            raise Unavailable(f"File store unavailable: {exc.strerror or exc}") from exc
        try:
            yield _read_chunks(handle)
        finally:
            with trio.CancelScope(shield=True):
                await handle.aclose()

    async def delete(self, key: str) -> None:
        try:
            path = self._path(key)
        except NotFound:
            return
        await trio.to_thread.run_sync(_unlink_quiet, path)

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (a folder such as ``sessions/<sid>/uploads/``);
        returns how many were removed, like the S3 store."""
        folder = prefix.rstrip("/")
        try:
            path = self._path(folder)
        except NotFound:
            return 0
        return await trio.to_thread.run_sync(_remove_tree, path)

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, mtime)`` under ``prefix`` after ``start_after`` (key order), for
        the orphan sweeper. Objects are installed by rename, so a listed file is complete."""

        def walk() -> list[tuple[str, float]]:
            base = self.root / prefix.rstrip("/")
            found: list[tuple[str, float]] = []
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    path = Path(dirpath) / name
                    key = path.relative_to(self.root).as_posix()
                    if key > start_after:
                        try:
                            found.append((key, path.stat().st_mtime))
                        except FileNotFoundError:
                            continue
            found.sort()
            return found[:limit]

        return await trio.to_thread.run_sync(walk)

    async def ping(self) -> dict[str, Any]:
        ok = await trio.to_thread.run_sync(os.access, self.root, os.W_OK)
        if not ok:
            raise Unavailable(f"File store unavailable: {self.root} is not writable")
        return {"backend": "local"}


async def _read_chunks(handle: Any) -> AsyncIterator[bytes]:
    while chunk := await handle.read(CHUNK):
        yield chunk


def _link_or_copy(spooled: Spooled, tmp: Path) -> None:
    """A second name for the caller's spool file (same filesystem: no bytes move), else a copy.
    The spool is ``mkstemp``'s 0600; stored objects get the mode a fresh file would have."""
    try:
        os.link(spooled.path, tmp)
    except OSError:
        shutil.copyfile(spooled.path, tmp)
    if os.stat(tmp).st_size != spooled.size:
        raise OSError(errno.EIO, "the upload spool changed size")
    os.chmod(tmp, 0o666 & ~_UMASK)


def _install(tmp: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def _remove_tree(path: Path) -> int:
    """Remove a folder of objects; the number of objects (files) it held."""
    count = sum(len(names) for _, _, names in os.walk(path))
    shutil.rmtree(path, ignore_errors=True)
    return count


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
