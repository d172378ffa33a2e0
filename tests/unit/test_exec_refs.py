"""Finding 4: file refs are capped, resolved before a sandbox is taken, and a deadline hit while
resolving them is reported truthfully (the code did not run). Core lifecycle with in-process twins."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core.errors import ApiError
from kcr_trio.core.exec import ExecLimits, ExecRequest, ExecService, Phases
from kcr_trio.core.model import FileRecord, FileRef, RunResult
from tests.unit.test_exec_lifecycle import LIMITS as LIFECYCLE_LIMITS

LIMITS = replace(LIFECYCLE_LIMITS, max_file_refs=3)


class StuckLookups(MemorySessionStore):
    """File lookups wait until ``release`` is set (a slow store, or thousands of bogus refs)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def get_file(self, session_id: str, file_id: str) -> FileRecord | None:
        await self.release.wait()
        return await super().get_file(session_id, file_id)


async def ok(code: str, files: dict[str, bytes]) -> RunResult:
    await trio.lowlevel.checkpoint()
    return RunResult(0, code, "")


def _refs(n: int) -> list[FileRef]:
    return [FileRef(f"f{i:020d}", f"s{i:020d}", f"{i}.csv") for i in range(n)]


async def test_too_many_refs_is_413_before_anything_runs(tmp_path: Path) -> None:
    executor = MemoryExecutor(ok, capacity=1)
    svc = ExecService(MemorySessionStore(), LocalFileStore(tmp_path), executor, LIMITS)
    with pytest.raises(ApiError) as err:
        await svc.execute(ExecRequest(code="x", lang="py", request_id="r", files=_refs(4)), Phases())
    assert err.value.status == 413 and "at most 3 file references" in err.value.message
    assert executor.released == 0


async def test_ref_lookups_do_not_hold_a_sandbox(tmp_path: Path) -> None:
    sessions = StuckLookups()
    svc = ExecService(sessions, LocalFileStore(tmp_path), MemoryExecutor(ok, capacity=1), LIMITS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.execute, ExecRequest(code="slow", lang="py", request_id="1", files=_refs(3)), Phases())
        await trio.testing.wait_all_tasks_blocked()
        # The only slot is free while the first request is still resolving its refs.
        outcome = await svc.execute(ExecRequest(code="fast", lang="py", request_id="2"), Phases())
        assert outcome.status == "completed" and outcome.stdout == "fast\n"
        sessions.release.set()


async def test_deadline_while_resolving_refs_is_not_called_an_execution_timeout(tmp_path: Path) -> None:
    limits = ExecLimits(1, 1, 0.2, 1000, 10, 1024 * 1024, 10_000, max_file_refs=3)
    executor = MemoryExecutor(ok, capacity=1)
    svc = ExecService(StuckLookups(), LocalFileStore(tmp_path), executor, limits)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r", files=_refs(1)), Phases())
    assert outcome.status == "timeout"
    assert "Execution timed out" not in outcome.stderr
    assert "input files" in outcome.stderr and "did not run" in outcome.stderr
