"""One behaviour for every ``SessionStore`` and ``FileStore``: the in-process twins and the real
Redis/S3 backends run the same tests, so the core can be tested against the twins with confidence."""

from __future__ import annotations

import datetime as dt
import os
from functools import partial
from pathlib import Path

import pytest
import trio

from kcr_trio.core import errors
from kcr_trio.core.interfaces import FileStore, SessionStore, Spooled
from kcr_trio.core.model import FOREVER, FileRecord, utcnow


def record(sid: str, fid: str, *, name: str = "data.csv", kind: str = "upload", age: float = 0.0) -> FileRecord:
    return FileRecord(
        session_id=sid,
        file_id=fid,
        filename=name,
        content_type="text/csv",
        size=12,
        created_at=utcnow() - dt.timedelta(seconds=age),
        kind=kind,  # type: ignore[arg-type]
    )


async def chunks(*parts: bytes):
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def read_all(store: FileStore, key: str) -> bytes:
    async with store.open(key) as body:
        return b"".join([chunk async for chunk in body])


# --- SessionStore ----------------------------------------------------------------------------------


async def test_session_store_is_the_protocol(session_store: SessionStore) -> None:
    assert isinstance(session_store, SessionStore)


async def test_create_and_get_session(session_store: SessionStore) -> None:
    created = await session_store.create_session(entity_id="ent-1", user_id="user-1")
    assert created.status == "active" and created.active
    assert created.expires_at == FOREVER  # SESSION_TTL_HOURS=0
    assert created.metadata == {"entity_id": "ent-1", "user_id": "user-1"}

    got = await session_store.get_session(created.session_id)
    assert got is not None
    assert got.session_id == created.session_id
    assert got.metadata == created.metadata
    assert abs((got.created_at - created.created_at).total_seconds()) < 0.001
    assert got.last_activity >= created.last_activity


async def test_session_without_entity_has_empty_metadata(session_store: SessionStore) -> None:
    created = await session_store.create_session(entity_id=None, user_id=None)
    got = await session_store.get_session(created.session_id)
    assert got is not None and got.metadata == {}


async def test_unknown_session_is_none(session_store: SessionStore) -> None:
    assert await session_store.get_session("nope-not-a-session") is None
    assert await session_store.find_entity_session("nobody") is None


async def test_get_refreshes_last_activity(session_store: SessionStore) -> None:
    created = await session_store.create_session(entity_id=None, user_id=None)
    first = await session_store.get_session(created.session_id)
    assert first is not None
    seen = first.last_activity  # (a twin may hand out the same mutable object again)
    # Wait until the clock has visibly moved, then read again.
    with trio.fail_after(2):
        while utcnow() <= seen:
            await trio.sleep(0.001)
    second = await session_store.get_session(created.session_id)
    assert second is not None and second.last_activity > seen


async def test_find_entity_session_returns_an_active_session_of_that_entity(session_store: SessionStore) -> None:
    a = await session_store.create_session(entity_id="ent-A", user_id=None)
    b = await session_store.create_session(entity_id="ent-A", user_id=None)
    other = await session_store.create_session(entity_id="ent-B", user_id=None)
    found = await session_store.find_entity_session("ent-A")
    assert found is not None and found.active
    assert found.session_id in {a.session_id, b.session_id}
    found_b = await session_store.find_entity_session("ent-B")
    assert found_b is not None and found_b.session_id == other.session_id


async def test_file_metadata_roundtrip(session_store: SessionStore) -> None:
    s = await session_store.create_session(entity_id=None, user_id=None)
    up = record(s.session_id, "file-upload-1", name="in.csv", kind="upload", age=2)
    out = record(s.session_id, "file-output-1", name="plot.png", kind="output", age=1)
    await session_store.add_file(up)
    await session_store.add_file(out)

    got = await session_store.get_file(s.session_id, up.file_id)
    assert got is not None
    assert (got.filename, got.kind, got.size, got.content_type) == ("in.csv", "upload", 12, "text/csv")
    assert got.object_key == f"sessions/{s.session_id}/uploads/file-upload-1"
    assert got.path == "/in.csv"
    got_out = await session_store.get_file(s.session_id, out.file_id)
    assert got_out is not None and got_out.path == "/outputs/plot.png"
    assert got_out.object_key == f"sessions/{s.session_id}/outputs/file-output-1"

    listed = await session_store.list_files(s.session_id)
    assert [r.file_id for r in listed] == [up.file_id, out.file_id]  # oldest first

    deleted = await session_store.delete_file(s.session_id, up.file_id)
    assert deleted is not None and deleted.file_id == up.file_id
    assert await session_store.get_file(s.session_id, up.file_id) is None
    assert await session_store.delete_file(s.session_id, up.file_id) is None
    assert [r.file_id for r in await session_store.list_files(s.session_id)] == [out.file_id]


async def test_file_lookups_are_scoped_to_their_session(session_store: SessionStore) -> None:
    s1 = await session_store.create_session(entity_id=None, user_id=None)
    s2 = await session_store.create_session(entity_id=None, user_id=None)
    await session_store.add_file(record(s1.session_id, "shared-id"))
    assert await session_store.get_file(s2.session_id, "shared-id") is None
    assert await session_store.list_files(s2.session_id) == []
    assert await session_store.list_files("no-such-session") == []


async def test_files_and_session_in_one_call(session_store: SessionStore) -> None:
    """``/files?detail=summary``'s one call answers exactly what ``list_files`` and ``get_session``
    answer, and refreshes ``last_activity`` as ``get_session`` does."""
    s = await session_store.create_session(entity_id="ent-both", user_id="u-both")
    for i, age in enumerate((3, 1, 2)):
        await session_store.add_file(record(s.session_id, f"file-{i}", name=f"f{i}.csv", age=age))
    await session_store.add_file(record("other-session", "file-x"))
    seen = (await session_store.get_session(s.session_id)).last_activity  # type: ignore[union-attr]
    with trio.fail_after(2):
        while utcnow() <= seen:
            await trio.sleep(0.001)

    records, session = await session_store.list_files_and_session(s.session_id)
    assert [r.file_id for r in records] == ["file-0", "file-2", "file-1"]  # oldest first
    assert records == await session_store.list_files(s.session_id)
    assert session is not None and session.session_id == s.session_id and session.active
    assert session.metadata == {"entity_id": "ent-both", "user_id": "u-both"}
    assert session.last_activity > seen
    stored = await session_store.get_session(s.session_id)
    assert stored is not None and stored.last_activity >= session.last_activity

    assert await session_store.list_files_and_session("no-such-session") == ([], None)
    await session_store.forget_session(s.session_id)
    assert await session_store.list_files_and_session(s.session_id) == (
        await session_store.list_files(s.session_id), None
    )


async def test_hit_counts_per_key_in_a_window(session_store: SessionStore) -> None:
    key = f"k-{os.getpid()}-{id(session_store)}"
    counts = [await session_store.hit(key, 3600) for _ in range(3)]
    assert counts == [1, 2, 3]
    assert await session_store.hit(key + "-other", 3600) == 1


async def test_ping(session_store: SessionStore) -> None:
    status = await session_store.ping()
    assert isinstance(status, dict) and status


async def test_cancelled_calls_leave_the_store_usable(session_store: SessionStore) -> None:
    s = await session_store.create_session(entity_id="ent-c", user_id=None)
    for _ in range(50):
        with trio.move_on_after(0):
            await session_store.get_session(s.session_id)
    with trio.fail_after(5):
        got = await session_store.get_session(s.session_id)
    assert got is not None and got.session_id == s.session_id


async def test_forget_session_drops_it_idempotently(session_store: SessionStore) -> None:
    """The purge's last step (``core.files.purge_session``), after the files' metadata and bytes."""
    s = await session_store.create_session(entity_id="ent-forget", user_id=None)
    await session_store.add_file(record(s.session_id, "f-forget"))
    await session_store.delete_file(s.session_id, "f-forget")
    await session_store.forget_session(s.session_id)
    await session_store.forget_session(s.session_id)
    assert await session_store.get_session(s.session_id) is None
    assert await session_store.list_files(s.session_id) == []
    assert await session_store.find_entity_session("ent-forget") is None
    assert isinstance(await session_store.expired_sessions(), list)


# --- FileStore -------------------------------------------------------------------------------------


async def test_file_store_is_the_protocol(file_store: FileStore) -> None:
    assert isinstance(file_store, FileStore)


async def test_put_and_open_roundtrip(file_store: FileStore) -> None:
    payload = [os.urandom(100_000), b"", os.urandom(7), os.urandom(300_000)]
    key = "sessions/s-round/uploads/f-1"
    size = await file_store.put(key, chunks(*payload), content_type="application/octet-stream")
    assert size == sum(map(len, payload))
    assert await read_all(file_store, key) == b"".join(payload)


async def test_empty_file(file_store: FileStore) -> None:
    key = "sessions/s-empty/outputs/f-0"
    assert await file_store.put(key, chunks(), content_type="text/plain") == 0
    assert await read_all(file_store, key) == b""


async def test_too_large_stores_nothing(file_store: FileStore) -> None:
    key = "sessions/s-big/uploads/f-big"
    with pytest.raises(errors.TooLarge):
        await file_store.put(key, chunks(b"a" * 600, b"b" * 600), content_type="text/plain", max_bytes=1000)
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)
    # Exactly at the limit is fine.
    assert await file_store.put(key, chunks(b"a" * 1000), content_type="text/plain", max_bytes=1000) == 1000


async def test_put_from_a_spool_file(file_store: FileStore, tmp_path: Path) -> None:
    """An upload's spool goes in as a file (no second copy); the caller's file is left as it was,
    and the stored object does not depend on it afterwards (the edge removes its spool)."""
    data = os.urandom(3_000_001)
    spool = tmp_path / "spool.upload"
    spool.write_bytes(data)
    key = "sessions/s-spool/uploads/f-spool"
    assert await file_store.put(key, Spooled(spool, len(data)), content_type="text/csv", max_bytes=len(data)) == len(data)
    assert spool.read_bytes() == data
    spool.unlink()
    assert await read_all(file_store, key) == data


async def test_spool_over_the_limit_stores_nothing(file_store: FileStore, tmp_path: Path) -> None:
    spool = tmp_path / "big.upload"
    spool.write_bytes(b"x" * 1001)
    key = "sessions/s-spool-big/uploads/f-big"
    with pytest.raises(errors.TooLarge):
        await file_store.put(key, Spooled(spool, 1001), content_type="text/plain", max_bytes=1000)
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)
    assert spool.exists()


async def test_spool_that_changed_size_stores_nothing(file_store: FileStore, tmp_path: Path) -> None:
    """The size is signed into the S3 PUT and returned as the file's size: a spool that is not the
    size announced is refused, never stored short or long."""
    spool = tmp_path / "short.upload"
    spool.write_bytes(b"abc")
    key = "sessions/s-spool-short/uploads/f-short"
    with pytest.raises(errors.Unavailable):
        await file_store.put(key, Spooled(spool, 10), content_type="text/plain")
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)


async def test_open_missing_is_not_found(file_store: FileStore) -> None:
    with pytest.raises(errors.NotFound):
        async with file_store.open("sessions/s-none/uploads/missing"):
            pass


async def test_delete_is_idempotent(file_store: FileStore) -> None:
    key = "sessions/s-del/uploads/f-del"
    await file_store.put(key, chunks(b"bye"), content_type="text/plain")
    await file_store.delete(key)
    await file_store.delete(key)
    await file_store.delete("sessions/s-del/uploads/never-existed")
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)


async def test_cancelled_upload_leaves_nothing(file_store: FileStore) -> None:
    key = "sessions/s-cancel/uploads/f-cancel"
    started = trio.Event()

    async def stalling():
        yield b"first part"
        started.set()
        await trio.sleep_forever()
        yield b"never"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(file_store.put, key, stalling(), content_type="text/plain"))
        await started.wait()
        nursery.cancel_scope.cancel()
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)


async def test_upload_failing_in_the_source_leaves_nothing(file_store: FileStore) -> None:
    key = "sessions/s-fail/uploads/f-fail"

    async def broken():
        yield b"some bytes"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        await file_store.put(key, broken(), content_type="text/plain")
    with pytest.raises(errors.NotFound):
        await read_all(file_store, key)


async def test_leaving_a_download_early_releases_it(file_store: FileStore) -> None:
    key = "sessions/s-early/outputs/f-early"
    await file_store.put(key, chunks(os.urandom(1_000_000)), content_type="application/octet-stream")
    for _ in range(30):  # more than any pool size
        async with file_store.open(key) as body:
            async for _chunk in body:
                break
    with trio.fail_after(5):
        assert len(await read_all(file_store, key)) == 1_000_000


async def test_prefix_listing_and_deletion(file_store: FileStore) -> None:
    """What the orphan sweeper and the purge use: pages in key order, and a count of what went."""
    base = f"sessions/s-prefix-{os.urandom(4).hex()}/"
    keys = sorted(f"{base}uploads/f-{i}" for i in range(3))
    for key in [*keys, f"{base}outputs/f-out"]:
        await file_store.put(key, chunks(b"x"), content_type="text/plain")
    first = await file_store.list_objects(base, limit=2)
    assert [key for key, _ in first] == sorted([*keys, f"{base}outputs/f-out"])[:2]
    assert all(isinstance(modified, float) for _, modified in first)
    rest = await file_store.list_objects(base, start_after=first[-1][0])
    assert [key for key, _ in first + rest] == sorted([*keys, f"{base}outputs/f-out"])
    assert await file_store.delete_prefix(f"{base}uploads/") == 3
    assert await file_store.delete_prefix(f"{base}uploads/") == 0
    assert [key for key, _ in await file_store.list_objects(base)] == [f"{base}outputs/f-out"]


async def test_file_store_ping(file_store: FileStore) -> None:
    status = await file_store.ping()
    assert isinstance(status, dict) and status
