"""Real ``kcr-trio serve`` processes (real sidecars) for the PTC tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_process

OTHER_KEY = "other-key-0123456789abcdef"
# KCR_PTC_BASH_SETTLE: the tests check that background bash calls (`a & b & wait`) go out as one
# batch. At the default 50 ms a loaded CI machine sometimes starts the second job later than that and
# the batch splits ([1, 1, 1] rounds instead of [1, 2]); a wider window keeps what is tested (calls
# that arrive together are batched, sequential calls are not) without depending on the load.
PTC_ENV = {"API_KEYS": OTHER_KEY, "MAX_EXECUTION_TIME": "20", "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "1",
           "KCR_SANDBOX": "auto", "KCR_PTC_BASH_SETTLE": "0.3"}


@pytest.fixture(scope="module")
def ptc_server() -> Iterator[ServerProcess]:
    with server_process(PTC_ENV) as server:
        yield server
