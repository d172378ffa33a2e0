"""A real ``kcr-trio serve`` with real sidecars, for the newest-contract tests (module scoped)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_process

ENV = {
    "MAX_EXECUTION_TIME": "6",
    "MAX_FILE_SIZE_MB": "1",
    "MAX_OUTPUT_FILES": "3",
    "POD_POOL_PY": "1",
    "POD_POOL_JS": "1",
    "POD_POOL_BASH": "1",
    "KCR_SANDBOX": "auto",
}


@pytest.fixture(scope="module")
def real_server() -> Iterator[ServerProcess]:
    with server_process(ENV) as server:
        yield server
