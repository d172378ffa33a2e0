"""``bench engine``'s latency rounds: /exec, the bare start and the same client's ``/health`` floor.

An in-process server on a real loopback socket with the in-process executor (what is measured here
is the bench's bookkeeping, not the engine): every round records an /exec, a bare start of the
interpreter and a ``GET /health`` on the same client.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import httpx
import pytest
import trio

from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.bench.engine import latency_interleaved
from kcr_trio.bench.lean import LeanClient
from kcr_trio.core.model import RunResult
from tests.support.server import TEST_KEY, make_settings, running_server

pytestmark = pytest.mark.integration


async def hi(code: str, files: dict[str, bytes]) -> RunResult:
    await trio.lowlevel.checkpoint()
    return RunResult(0, "hi\n", "")


async def test_latency_rows_carry_the_health_floor_of_the_same_client(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path), executor=MemoryExecutor(hi)) as url:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": TEST_KEY}, trust_env=False) as client:
            rows = await latency_interleaved({"a": client}, "py", sys.executable, 3, trio.current_time() + 60)
    row = rows["a"]
    assert row["ok"] == 3 and row["errors"] == 0 and row["rounds"] == 3
    assert math.isfinite(row["health_p50_ms"]) and row["health_p50_ms"] > 0
    assert row["bare_p50_ms"] > 0 and row["exec_p50_ms"] > 0


async def test_the_lean_client_times_the_same_rounds_and_counts_wrong_answers(tmp_path: Path) -> None:
    async def wrong(code: str, files: dict[str, bytes]) -> RunResult:
        await trio.lowlevel.checkpoint()
        return RunResult(0, "not hi\n", "")

    for program, ok in ((hi, 3), (wrong, 0)):
        async with running_server(make_settings(tmp_path), executor=MemoryExecutor(program)) as url:
            lean = LeanClient(url, headers={"X-API-Key": TEST_KEY})
            try:
                rows = await latency_interleaved({"a": lean}, "py", sys.executable, 3, trio.current_time() + 60)
            finally:
                await lean.aclose()
        row = rows["a"]
        assert row["ok"] == ok and row["errors"] == 3 - ok  # a wrong stdout is an error, not a sample
        assert math.isfinite(row["health_p50_ms"]) and row["health_p50_ms"] > 0


async def test_the_lean_client_reconnects_after_a_refused_key(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path), executor=MemoryExecutor(hi)) as url:
        lean = LeanClient(url, headers={"X-API-Key": "wrong-key"})
        try:
            assert (await lean.post("/exec", json={"lang": "py", "code": "x"})).status_code == 401
            assert (await lean.get("/health")).status_code == 200  # the same client carries on
        finally:
            await lean.aclose()
