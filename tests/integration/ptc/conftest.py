"""Real ``kcr-trio serve`` processes (real sidecars) for the PTC tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_process

OTHER_KEY = "other-key-0123456789abcdef"
PTC_ENV = {"API_KEYS": OTHER_KEY, "MAX_EXECUTION_TIME": "20", "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "1",
           "KCR_SANDBOX": "auto"}


@pytest.fixture(scope="module")
def ptc_server() -> Iterator[ServerProcess]:
    with server_process(PTC_ENV) as server:
        yield server
