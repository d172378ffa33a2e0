"""Two real ``kcr-trio serve`` processes for the bench tests: A with the hang-up mitigations (the
defaults), B without them (``KCR_HEARTBEAT=false``, ``KCR_CONNECTION_CLOSE=false``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import TEST_KEY, ServerProcess, server_process

BENCH_ENV = {
    "MAX_EXECUTION_TIME": "10",
    "MAX_FILE_SIZE_MB": "1",
    "POD_POOL_PY": "2",
    "POD_POOL_JS": "1",
    "POD_POOL_BASH": "0",
    "KCR_SANDBOX": "auto",
}


@pytest.fixture(scope="package")
def bench_servers() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    # Two local executors on one host must not share run uids: each one's clean-up kills every
    # process of a uid it frees, which would hit the other server's programs (SIGKILL, exit 137).
    with server_process({**BENCH_ENV, "KCR_LOCAL_RUN_UID_BASE": "2000200000"}) as a, server_process(
        {**BENCH_ENV, "KCR_LOCAL_RUN_UID_BASE": "2000300000", "KCR_HEARTBEAT": "false", "KCR_CONNECTION_CLOSE": "false"}
    ) as b:
        yield a, b


@pytest.fixture
def target_args(bench_servers: tuple[ServerProcess, ServerProcess]) -> list[str]:
    a, b = bench_servers
    return ["--target", f"A={a.url},{TEST_KEY}", "--target", f"B={b.url},{TEST_KEY}"]
