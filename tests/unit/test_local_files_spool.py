"""The local store takes an upload's spool file by hard link (no bytes copied), and copies it only
when a link is impossible (the spool on another filesystem)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from kcr_trio.backends import local_files
from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.core.interfaces import Spooled

KEY = "sessions/s1/uploads/f1"


def _spool(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "spool" / "x.upload"
    path.parent.mkdir()
    path.write_bytes(data)
    path.chmod(0o600)  # what mkstemp gives the edge's spool
    return path


async def test_spool_on_the_same_filesystem_is_linked(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files")
    spool = _spool(tmp_path, b"linked bytes")
    assert await store.put(KEY, Spooled(spool, 12), content_type="text/plain") == 12
    stored = tmp_path / "files" / KEY
    assert os.stat(stored).st_ino == os.stat(spool).st_ino  # one inode, two names: nothing copied
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o666 & ~local_files._UMASK
    spool.unlink()  # the edge's clean-up
    assert stored.read_bytes() == b"linked bytes"
    assert list((tmp_path / "files" / ".partial").iterdir()) == []


async def test_spool_that_cannot_be_linked_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(local_files.os, "link", no_link)
    store = LocalFileStore(tmp_path / "files")
    spool = _spool(tmp_path, b"copied")
    assert await store.put(KEY, Spooled(spool, 6), content_type="text/plain") == 6
    stored = tmp_path / "files" / KEY
    assert os.stat(stored).st_ino != os.stat(spool).st_ino
    assert stored.read_bytes() == b"copied"
    assert list((tmp_path / "files" / ".partial").iterdir()) == []
