"""The file domain's storage rules (``core.files``) on the in-process twins, with faults injected.

What must hold whatever fails or is cancelled: a file's metadata is written only after its bytes,
a failed or cancelled store leaves no visible file and (clean-up permitting) no bytes, and never
metadata without bytes. Deletion and purges go metadata first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

import pytest
import trio

from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core import files as core_files
from kcr_trio.core.errors import ApiError, NotFound, TooLarge, Unavailable
from kcr_trio.core.files import Incoming, Upload, delete_file, purge_session, store_files, store_uploads
from kcr_trio.core.ids import new_id
from kcr_trio.core.interfaces import FileStore, SessionStore
from kcr_trio.core.model import FileRecord, utcnow


class Sessions(MemorySessionStore):
    """Memory sessions that log calls and can fail or block ``add_file`` for chosen file names."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.log = log
        self.fail_add: set[str] = set()
        self.fail_delete = False
        self.block_add: set[str] = set()
        self.add_started = trio.Event()

    async def add_file(self, record: FileRecord) -> None:
        self.log.append(("add", record.filename))
        if record.filename in self.block_add:
            self.add_started.set()
            await trio.sleep_forever()
        if record.filename in self.fail_add:
            raise Unavailable("Session store unavailable: down")
        await super().add_file(record)

    async def delete_file(self, session_id: str, file_id: str) -> FileRecord | None:
        self.log.append(("delete_meta", file_id))
        if self.fail_delete:
            raise Unavailable("Session store unavailable: down")
        return await super().delete_file(session_id, file_id)

    async def forget_session(self, session_id: str) -> None:
        self.log.append(("forget", session_id))
        await super().forget_session(session_id)


class Files(LocalFileStore):
    """Local files that log puts/deletes, count concurrent puts, and can fail chosen operations."""

    def __init__(self, root: Path, log: list[tuple[str, str]]) -> None:
        super().__init__(root)
        self.log = log
        self.active = self.peak = 0
        self.fail_delete = False
        self.fail_ping = False

    async def put(self, key: str, chunks, *, content_type: str, max_bytes: int | None = None) -> int:  # type: ignore[no-untyped-def]
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(0)
            size = await super().put(key, chunks, content_type=content_type, max_bytes=max_bytes)
        finally:
            self.active -= 1
        self.log.append(("put", key))
        return size

    async def delete(self, key: str) -> None:
        self.log.append(("delete_bytes", key))
        if self.fail_delete:
            raise Unavailable("File store unavailable: down")
        await super().delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        self.log.append(("delete_prefix", prefix))
        return await super().delete_prefix(prefix)

    async def ping(self) -> dict[str, object]:
        if self.fail_ping:
            raise Unavailable("File store unavailable: down")
        return await super().ping()

    async def keys(self) -> list[str]:
        return [key for key, _ in await self.list_objects("sessions/")]


@pytest.fixture
def world(tmp_path: Path) -> tuple[Sessions, Files, list[tuple[str, str]]]:
    log: list[tuple[str, str]] = []
    return Sessions(log), Files(tmp_path / "files", log), log


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def item(sid: str, name: str, data: bytes = b"data", kind: str = "upload") -> Incoming:
    record = FileRecord(sid, new_id(), name, "text/plain", 0, utcnow(), kind)  # type: ignore[arg-type]
    return Incoming(record, lambda: nullcontext(_chunks(data)))


def missing(sid: str, name: str) -> Incoming:
    """An output whose bytes cannot be fetched (the sandbox lost it)."""

    @asynccontextmanager
    async def source() -> AsyncIterator[AsyncIterator[bytes]]:
        raise NotFound("File not found")
        yield _chunks(b"")  # pragma: no cover

    record = FileRecord(sid, new_id(), name, "text/plain", 0, utcnow(), "output")
    return Incoming(record, source)


def test_the_twins_implement_the_protocols(world) -> None:
    sessions, files, _ = world
    assert isinstance(sessions, SessionStore) and isinstance(files, FileStore)


async def test_bytes_first_metadata_last_in_the_order_given(world) -> None:
    sessions, files, log = world
    items = [item("s1", f"f{i}.txt", bytes([i]) * (i + 1)) for i in range(6)]
    stored = await store_files(sessions, files, items, max_bytes=None, all_or_nothing=True, concurrency=3)
    assert [r.filename for r in stored.records] == [f"f{i}.txt" for i in range(6)] and stored.unsaved == []
    kinds = [kind for kind, _ in log]
    assert kinds == ["put"] * 6 + ["add"] * 6  # no file becomes visible before every byte is stored
    assert [name for kind, name in log if kind == "add"] == [f"f{i}.txt" for i in range(6)]
    assert [r.size for r in stored.records] == [i + 1 for i in range(6)]  # sizes from the bytes stored
    assert [r.filename for r in await sessions.list_files("s1")] == [f"f{i}.txt" for i in range(6)]
    assert 1 < files.peak <= 3  # concurrent, and bounded


async def test_all_or_nothing_failure_removes_everything_and_raises_the_error_itself(world) -> None:
    sessions, files, _ = world
    items = [item("s1", "a.txt"), item("s1", "big.bin", b"x" * 100), item("s1", "c.txt")]
    with pytest.raises(TooLarge):  # not an exception group
        await store_files(sessions, files, items, max_bytes=10, all_or_nothing=True, concurrency=1)
    assert await sessions.list_files("s1") == [] and await files.keys() == []


async def test_all_or_nothing_metadata_failure_removes_the_files_already_recorded(world) -> None:
    sessions, files, _ = world
    sessions.fail_add = {"b.txt"}
    with pytest.raises(Unavailable):
        await store_files(sessions, files, [item("s1", "a.txt"), item("s1", "b.txt")], max_bytes=None,
                          all_or_nothing=True)
    assert await sessions.list_files("s1") == [] and await files.keys() == []


async def test_best_effort_skips_a_file_whose_bytes_fail_and_keeps_the_rest(world) -> None:
    sessions, files, _ = world
    items = [item("s1", "a.txt", kind="output"), missing("s1", "gone.txt"), item("s1", "c.txt", kind="output")]
    stored = await store_files(sessions, files, items, max_bytes=None, all_or_nothing=False)
    assert [r.filename for r in stored.records] == ["a.txt", "c.txt"]
    assert [(u.names, u.stage) for u in stored.unsaved] == [(("gone.txt",), "bytes")]
    assert stored.unsaved[0].reason == "File not found"
    assert sorted(await files.keys()) == sorted(r.object_key for r in stored.records)


async def test_best_effort_metadata_failure_keeps_recorded_files_and_drops_the_others_bytes(world) -> None:
    sessions, files, _ = world
    sessions.fail_add = {"b.txt"}
    items = [item("s1", name, kind="output") for name in ("a.txt", "b.txt", "c.txt")]
    stored = await store_files(sessions, files, items, max_bytes=None, all_or_nothing=False)
    assert [r.filename for r in stored.records] == ["a.txt"]
    assert [(u.names, u.stage) for u in stored.unsaved] == [(("b.txt", "c.txt"), "metadata")]
    assert [r.filename for r in await sessions.list_files("s1")] == ["a.txt"]
    assert await files.keys() == [items[0].record.object_key]  # a listed file keeps its bytes


@pytest.mark.parametrize("all_or_nothing", [True, False])
async def test_cancelled_while_recording_metadata_leaves_nothing(world, all_or_nothing: bool) -> None:
    sessions, files, log = world
    sessions.block_add = {"b.txt"}
    items = [item("s1", name) for name in ("a.txt", "b.txt")]
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await store_files(sessions, files, items, max_bytes=None, all_or_nothing=all_or_nothing)
            raise AssertionError("not cancelled")

        nursery.start_soon(run)
        await sessions.add_started.wait()
        nursery.cancel_scope.cancel()
    # The shielded clean-up ran although the caller was cancelled: metadata first, then bytes.
    assert await sessions.list_files("s1") == [] and await files.keys() == []
    cleanup = [kind for kind, _ in log[log.index(("add", "b.txt")) + 1:]]
    assert cleanup == ["delete_meta", "delete_bytes", "delete_meta", "delete_bytes"]


async def test_a_failing_clean_up_keeps_the_bytes_of_metadata_it_could_not_remove(world) -> None:
    sessions, files, _ = world
    sessions.fail_add = {"b.txt"}
    sessions.fail_delete = True
    items = [item("s1", "a.txt"), item("s1", "b.txt")]
    with pytest.raises(Unavailable, match="Session store"):  # the original error, not the clean-up's
        await store_files(sessions, files, items, max_bytes=None, all_or_nothing=True)
    # a.txt's metadata could not be removed, so its bytes stay: never metadata without bytes.
    assert [r.filename for r in await sessions.list_files("s1")] == ["a.txt"]
    assert items[0].record.object_key in await files.keys()


async def test_the_clean_up_is_bounded(world, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions, files, _ = world
    monkeypatch.setattr(core_files, "CLEANUP_TIMEOUT", 0.05)
    record = FileRecord("s1", new_id(), "a.txt", "text/plain", 1, utcnow(), "upload")

    async def stuck(session_id: str, file_id: str) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(sessions, "delete_file", stuck)
    with trio.fail_after(5):
        await core_files.discard(sessions, files, [record], metadata=True)


async def test_delete_changes_nothing_while_the_file_store_is_down(world) -> None:
    sessions, files, _ = world
    stored = await store_files(sessions, files, [item("s1", "a.txt")], max_bytes=None, all_or_nothing=True)
    record = stored.records[0]
    files.fail_ping = True
    with pytest.raises(ApiError):
        await delete_file(sessions, files, record)
    assert await sessions.get_file("s1", record.file_id) is not None and await files.keys() == [record.object_key]
    files.fail_ping = False
    files.fail_delete = True  # metadata goes; the bytes are left for the orphan sweeper
    await delete_file(sessions, files, record)
    assert await sessions.get_file("s1", record.file_id) is None and await files.keys() == [record.object_key]


async def test_purge_goes_metadata_then_bytes_then_the_session(world) -> None:
    sessions, files, log = world
    session = await sessions.create_session(entity_id=None, user_id=None)
    sid = session.session_id
    stored = await store_files(sessions, files, [item(sid, "a.txt"), item(sid, "b.txt", kind="output")],
                               max_bytes=None, all_or_nothing=True)
    stray = f"sessions/{sid}/outputs/{new_id()}"  # bytes whose metadata never landed
    await files.put(stray, _chunks(b"x"), content_type="text/plain")
    log.clear()
    assert await purge_session(sessions, files, sid) == 2
    kinds = [kind for kind, _ in log]
    assert kinds == ["delete_meta"] * 2 + ["delete_bytes"] * 2 + ["delete_prefix"] * 2 + ["forget"]
    assert await files.keys() == [] and await sessions.get_session(sid) is None
    assert stored.records[0].object_key not in await files.keys()
    assert await purge_session(sessions, files, sid) == 0  # idempotent


async def test_delete_prefix_counts_what_it_removed(world) -> None:
    _, files, _ = world
    for _ in range(3):
        await files.put(f"sessions/s1/uploads/{new_id()}", _chunks(b"x"), content_type="text/plain")
    assert await files.delete_prefix("sessions/s1/uploads/") == 3
    assert await files.delete_prefix("sessions/s1/uploads/") == 0


async def test_uploads_reuse_the_entitys_session_and_store_sanitised_names(world) -> None:
    sessions, files, _ = world

    def upload(name: str, data: bytes) -> Upload:
        return Upload(name, "text/csv", len(data), lambda: nullcontext(_chunks(data)))

    sid, records = await store_uploads(sessions, files, [upload("my data.csv", b"a,b\n"), upload("../x y", b"1")],
                                       entity_id="agent_1", owner="u1", max_bytes=100)
    assert [(r.filename, r.size, r.owner, r.kind) for r in records] == [
        ("my_data.csv", 4, "u1", "upload"), ("x_y", 1, "u1", "upload")]
    again, _ = await store_uploads(sessions, files, [upload("b.csv", b"b")], entity_id="agent_1", owner="u1",
                                   max_bytes=100)
    assert again == sid  # the entity's active session is reused
    other, _ = await store_uploads(sessions, files, [upload("c.csv", b"c")], entity_id=None, owner=None,
                                   max_bytes=100)
    assert other != sid
    with pytest.raises(TooLarge):
        await store_uploads(sessions, files, [upload("d.csv", b"d"), upload("e.csv", b"e" * 101)],
                            entity_id="agent_1", owner="u1", max_bytes=100)
    assert sorted(r.filename for r in await sessions.list_files(sid)) == ["b.csv", "my_data.csv", "x_y"]
