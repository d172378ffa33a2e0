"""The orphan sweeper's rules against the embedded stores (local files, memory sessions)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

from kcr_trio.backends import orphan_sweeper
from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FileRecord, utcnow


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_only_old_objects_without_metadata_go(tmp_path: Path, monkeypatch) -> None:
    sessions, files = MemorySessionStore(), LocalFileStore(tmp_path)
    session = await sessions.create_session(entity_id=None, user_id=None)
    kept = FileRecord(session.session_id, new_id(), "a.txt", "text/plain", 1, utcnow(), "upload")
    await files.put(kept.object_key, _chunks(b"a"), content_type="text/plain")
    await sessions.add_file(kept)
    orphans = [f"sessions/{session.session_id}/outputs/{new_id()}" for _ in range(3)]
    for key in orphans:
        await files.put(key, _chunks(b"o"), content_type="text/plain")
    await files.put("states/x/state.dat", _chunks(b"s"), content_type="text/plain")
    now = [time.time()]
    sweeper = orphan_sweeper.OrphanSweeper(sessions, files, min_age=60, clock=lambda: now[0])
    assert await sweeper.sweep_once() == 0  # too young: a writer may still be adding metadata
    now[0] += 120
    monkeypatch.setattr(orphan_sweeper, "BATCH", 2)  # pages of two: the cursor carries on
    total = 0
    for _ in range(3):
        total += await sweeper.sweep_once()
    assert total == 3
    keys = [key for key, _ in await files.list_objects("")]
    assert keys == sorted([kept.object_key, "states/x/state.dat"])
