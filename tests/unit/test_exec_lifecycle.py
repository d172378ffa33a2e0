"""The /exec lifecycle against the in-process twins: session choice, mounting, outputs, cancellation.

These exercise ``core.exec`` alone (no HTTP, no processes); the same behaviour is checked end to end
over real sockets with real sidecars in ``tests/integration/api``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core.errors import ApiError, Busy
from kcr_trio.core.exec import ExecLimits, ExecRequest, ExecService, Phases
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FileRecord, FileRef, RunResult, utcnow

LIMITS = ExecLimits(
    max_execution_time=5,
    overhead=5,
    acquire_timeout=0.2,
    max_output_chars=1000,
    max_output_files=10,
    max_file_bytes=1024 * 1024,
    max_code_bytes=10_000,
)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def store_upload(sessions: MemorySessionStore, files: LocalFileStore, sid: str, name: str, data: bytes) -> FileRecord:
    rec = FileRecord(sid, new_id(), name, "text/plain", len(data), utcnow(), "upload")
    await files.put(rec.object_key, _chunks(data), content_type="text/plain")
    await sessions.add_file(rec)
    return rec


@pytest.fixture
def stores(tmp_path: Path) -> tuple[MemorySessionStore, LocalFileStore]:
    return MemorySessionStore(), LocalFileStore(tmp_path / "files")


async def echo_inputs(code: str, files: dict[str, bytes]) -> RunResult:
    """A program that prints the names of the files it sees and writes one output."""
    await trio.lowlevel.checkpoint()
    files["out.txt"] = b"result"
    return RunResult(0, " ".join(sorted(k for k in files if k != "out.txt")), "")


async def test_new_session_and_outputs_are_stored(stores, tmp_path: Path) -> None:
    sessions, files = stores
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r"), Phases())
    assert outcome.status == "completed"
    assert [f["name"] for f in outcome.files] == ["out.txt"]
    record = await sessions.get_file(outcome.session_id, outcome.files[0]["id"])
    assert record is not None and record.kind == "output" and record.size == 6
    async with files.open(record.object_key) as chunks:
        assert b"".join([c async for c in chunks]) == b"result"


async def test_refs_mount_by_id_then_by_name_and_missing_is_skipped(stores) -> None:
    sessions, files = stores
    session = await sessions.create_session(entity_id=None, user_id=None)
    a = await store_upload(sessions, files, session.session_id, "a.csv", b"1")
    await store_upload(sessions, files, session.session_id, "b.csv", b"2")
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    req = ExecRequest(
        code="x",
        lang="py",
        request_id="r",
        files=[
            FileRef(a.file_id, session.session_id, "a.csv"),
            FileRef("", session.session_id, "b.csv"),  # agents' detail=full fallback gives id=""
            FileRef("nope", "nope", "x.csv"),
        ],
    )
    outcome = await svc.execute(req, Phases())
    assert outcome.session_id == session.session_id  # rule 2: the first ref's active session
    assert outcome.stdout == "a.csv b.csv\n"
    assert [f["name"] for f in outcome.files] == ["out.txt"]  # inputs only read are not echoed


async def test_session_uploads_are_mounted_even_when_not_listed(stores) -> None:
    """LibreChat sends only generated files after the first call; uploads must not vanish."""
    sessions, files = stores
    session = await sessions.create_session(entity_id=None, user_id=None)
    await store_upload(sessions, files, session.session_id, "data.csv", b"1")
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r", session_id=session.session_id), Phases())
    assert outcome.stdout == "data.csv\n"


async def test_entity_session_is_reused(stores) -> None:
    sessions, files = stores
    session = await sessions.create_session(entity_id="agent_1", user_id=None)
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r", entity_id="agent_1"), Phases())
    assert outcome.session_id == session.session_id


async def test_validation_errors_are_api_errors(stores) -> None:
    sessions, files = stores
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    with pytest.raises(ApiError) as err:
        await svc.execute(ExecRequest(code="  ", lang="py", request_id="r"), Phases())
    assert err.value.status == 400 and err.value.details[0]["code"] == "empty_code"
    with pytest.raises(ApiError) as err:
        await svc.execute(ExecRequest(code="x", lang="cobol", request_id="r"), Phases())
    assert err.value.details[0]["code"] == "unsupported_language"


async def test_busy_when_no_capacity_frees_up(stores) -> None:
    sessions, files = stores
    release = trio.Event()

    async def blocked(code: str, files: dict[str, bytes]) -> RunResult:
        await release.wait()
        return RunResult(0, "", "")

    executor = MemoryExecutor(blocked, capacity=1)
    svc = ExecService(sessions, files, executor, LIMITS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.execute, ExecRequest(code="x", lang="py", request_id="1"), Phases())
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Busy) as err:
            await svc.execute(ExecRequest(code="x", lang="py", request_id="2"), Phases())
        assert err.value.headers["Retry-After"] == "2"
        release.set()


async def test_cancellation_releases_the_sandbox_and_stores_nothing(stores) -> None:
    sessions, files = stores
    started = trio.Event()

    calls = []

    async def forever(code: str, files: dict[str, bytes]) -> RunResult:
        calls.append(code)
        if len(calls) > 1:
            return RunResult(0, "second", "")
        files["partial.txt"] = b"x"
        started.set()
        await trio.sleep_forever()
        raise AssertionError

    executor = MemoryExecutor(forever, capacity=1)
    svc = ExecService(sessions, files, executor, LIMITS)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.execute, ExecRequest(code="x", lang="py", request_id="1", session_id=None), Phases())
            await started.wait()
            scope.cancel()
    assert executor.released == 1
    assert files.root.joinpath("sessions").exists() is False  # no output bytes were stored
    # the only slot is free again: a second run gets it without waiting for the busy timeout
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="2"), Phases())
    assert outcome.status == "completed" and outcome.stdout == "second\n"


async def test_run_timeout_is_a_result(stores) -> None:
    sessions, files = stores

    async def slow(code: str, files: dict[str, bytes]) -> RunResult:
        await trio.sleep_forever()
        raise AssertionError

    limits = ExecLimits(1, 5, 0.2, 1000, 10, 1024 * 1024, 10_000)
    svc = ExecService(sessions, files, MemoryExecutor(slow), limits)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r"), Phases())
    assert outcome.status == "timeout"
    assert "timed out" in outcome.stderr


async def test_phases_are_timed(stores) -> None:
    sessions, files = stores
    svc = ExecService(sessions, files, MemoryExecutor(echo_inputs), LIMITS)
    phases = Phases()
    await svc.execute(ExecRequest(code="x", lang="py", request_id="r"), phases)
    assert set(phases.durations) == {"store", "acquire", "upload", "execute", "collect"}
