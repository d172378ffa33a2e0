"""Per-run work taken off the ``/exec`` path (issue 13): each shortcut skips only work whose result
was already known, and gives exactly what the longer form gave."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import trio

from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core import ids
from kcr_trio.core.exec import ExecLimits, ExecRequest, ExecService, Phases
from kcr_trio.core.model import FileRecord, RunResult, Session, utcnow

LIMITS = ExecLimits(max_execution_time=5, overhead=5, acquire_timeout=0.2, max_output_chars=1000,
                    max_output_files=10, max_file_bytes=1 << 20, max_code_bytes=10_000)


class CountingSessions(MemorySessionStore):
    """The memory store, counting the calls a run makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def list_files(self, session_id: str) -> list[FileRecord]:
        self.calls["list_files"] += 1
        return await super().list_files(session_id)

    async def create_session(self, *, entity_id: str | None, user_id: str | None) -> Session:
        self.calls["create_session"] += 1
        return await super().create_session(entity_id=entity_id, user_id=user_id)


async def ran(code: str, files: dict[str, bytes]) -> RunResult:
    await trio.lowlevel.checkpoint()
    return RunResult(0, " ".join(sorted(files)) or "none", "")


async def test_a_new_session_is_not_listed_for_uploads(tmp_path: Path) -> None:
    sessions = CountingSessions()
    svc = ExecService(sessions, LocalFileStore(tmp_path), MemoryExecutor(ran), LIMITS)
    outcome = await svc.execute(ExecRequest(code="x", lang="py", request_id="r"), Phases())
    assert outcome.status == "completed" and outcome.stdout == "none\n"
    assert sessions.calls == Counter(create_session=1)  # created for this run: nothing to list


async def test_an_existing_session_is_still_listed_and_its_uploads_mounted(tmp_path: Path) -> None:
    sessions = CountingSessions()
    files = LocalFileStore(tmp_path)
    session = await sessions.create_session(entity_id=None, user_id=None)
    record = FileRecord(session.session_id, ids.new_id(), "data.csv", "text/csv", 1, utcnow(), "upload")

    async def one_chunk():  # type: ignore[no-untyped-def]
        yield b"x"

    await files.put(record.object_key, one_chunk(), content_type="text/csv")
    await sessions.add_file(record)
    svc = ExecService(sessions, files, MemoryExecutor(ran), LIMITS)
    req = ExecRequest(code="x", lang="py", request_id="r", session_id=session.session_id)
    outcome = await svc.execute(req, Phases())
    assert outcome.stdout == "data.csv\n" and outcome.session_id == session.session_id
    assert sessions.calls["list_files"] == 1


async def test_phases_time_each_phase_and_name_the_one_cut_short(tmp_path: Path) -> None:
    phases = Phases()
    svc = ExecService(MemorySessionStore(), LocalFileStore(tmp_path), MemoryExecutor(ran), LIMITS)
    await svc.execute(ExecRequest(code="x", lang="py", request_id="r"), phases)
    assert list(phases.durations) == ["store", "acquire", "upload", "execute", "collect"]
    assert all(ms >= 0 for ms in phases.durations.values()) and phases.current is None

    cut = Phases()
    with trio.CancelScope() as scope:
        with cut.phase("execute"):
            assert cut.current == "execute"
            scope.cancel()
            await trio.sleep_forever()
    assert cut.current is None and "execute" in cut.durations


def test_new_ids_keep_their_shape_and_alphabet() -> None:
    made = [ids.new_id() for _ in range(10_000)]
    assert all(ids.ID_RE.fullmatch(i) for i in made)
    assert len(set(made)) == len(made)
    middle = Counter(c for i in made for c in i[1:-1])
    assert set(middle) <= set(ids._ALPHABET) and len(middle) == 64  # every symbol reachable
    assert re.fullmatch(r"[A-Za-z0-9_-]+", "".join(middle))
