"""``core.runtime`` with the in-process stores: TTL, lock contention, limits, bad manifests, ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from kcr_trio.backends.local_files import LocalFileStore
from kcr_trio.backends.memory_executor import MemorySandbox
from kcr_trio.backends.memory_sessions import MemorySessionStore
from kcr_trio.core import runtime
from kcr_trio.core.errors import ApiError, BadRequest
from kcr_trio.core.model import RunResult
from kcr_trio.core.runtime import RuntimeLimits, RuntimeStore, runtime_session_id, validate_hint

LIMITS = RuntimeLimits(ttl_seconds=60, max_bytes=100, max_files=3, lock_wait=0.2, lock_ttl=30)


async def _noop(code: str, files: dict[str, bytes]) -> RunResult:
    return RunResult(0, "", "")


def store(tmp_path: Path, **changes: float) -> RuntimeStore:
    limits = RuntimeLimits(**{**LIMITS.__dict__, **changes}) if changes else LIMITS
    return RuntimeStore(MemorySessionStore(), LocalFileStore(tmp_path / "files"), limits)


async def write(rs: RuntimeStore, rt: str, files: dict[str, bytes], removed: set[str] = frozenset()) -> list[str]:
    sandbox = MemorySandbox(_noop)
    sandbox.files = dict(files)
    async with rs.open(rt) as ws:
        await rs.commit(ws, sandbox, removed=set(removed), changed=[(n, len(d)) for n, d in files.items()],
                        max_file_bytes=1000)
        return ws.not_kept


async def names(rs: RuntimeStore, rt: str) -> tuple[str, list[str]]:
    async with rs.open(rt) as ws:
        return ws.status, sorted(ws.files)


async def test_ttl_starts_an_expired_workspace_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rs = store(tmp_path)
    now = [1_000_000.0]
    monkeypatch.setattr(runtime.time, "time", lambda: now[0])
    await write(rs, "rt_a", {"a.txt": b"1"})
    now[0] += 59
    assert await names(rs, "rt_a") == ("reused", ["a.txt"])
    now[0] += 61  # TTL counts from the last commit (59 s ago + 61 s > 60 s)
    assert await names(rs, "rt_a") == ("new", [])
    objects = [p for p in (tmp_path / "files").rglob("*") if p.is_file() and "manifest" not in p.name]
    assert objects == []  # the expired workspace's files were deleted


async def test_removed_and_replaced_files_leave_no_objects(tmp_path: Path) -> None:
    rs = store(tmp_path)
    await write(rs, "rt_b", {"a.txt": b"1", "b.txt": b"2"})
    await write(rs, "rt_b", {"a.txt": b"11"}, removed={"b.txt"})
    assert await names(rs, "rt_b") == ("reused", ["a.txt"])
    objects = [p for p in (tmp_path / "files").rglob("*") if p.is_file() and "manifest" not in p.name]
    assert len(objects) == 1 and objects[0].read_bytes() == b"11"


async def test_limits_leave_files_out(tmp_path: Path) -> None:
    rs = store(tmp_path)
    not_kept = await write(rs, "rt_c", {"a": b"x" * 60, "b": b"x" * 60, "c": b"1", "d": b"2", "e": b"3"})
    assert not_kept == ["b", "e"]  # b: over 100 bytes in total; e: a fourth file
    assert await names(rs, "rt_c") == ("reused", ["a", "c", "d"])


async def test_concurrent_open_waits_then_409(tmp_path: Path) -> None:
    rs = store(tmp_path)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        held = trio.Event()

        async def first() -> None:
            async with rs.open("rt_d"):
                held.set()
                await trio.sleep(0.1)
                order.append("first done")

        async def second() -> None:
            await held.wait()
            async with rs.open("rt_d"):
                order.append("second in")

        nursery.start_soon(first)
        nursery.start_soon(second)
    assert order == ["first done", "second in"]  # serialised, not refused

    async with rs.open("rt_d"):
        with pytest.raises(ApiError) as info:
            async with rs.open("rt_d"):
                pass
    assert info.value.status == 409 and info.value.error_type == "runtime_session_busy"


async def test_unreadable_manifest_starts_afresh(tmp_path: Path) -> None:
    rs = store(tmp_path)

    async def junk() -> AsyncIterator[bytes]:
        yield b"{not json"

    await rs.files.put("runtime/rt_e/manifest.json", junk(), content_type="application/json")
    assert await names(rs, "rt_e") == ("new", [])


def test_ids_and_hints() -> None:
    assert runtime_session_id("key:1", "h") != runtime_session_id("key:2", "h")
    assert runtime_session_id("key:1", "h") != runtime_session_id("key:1", "h2")
    assert runtime_session_id("a:b", "c") != runtime_session_id("a", "b:c")
    assert len(runtime_session_id("p", "h")) == 43
    assert validate_hint("v3:0123456789ab:x.y_z-1") == "v3:0123456789ab:x.y_z-1"
    for bad in ("", "a b", "x" * 129, None, 5, "é"):
        with pytest.raises(BadRequest):
            validate_hint(bad)
