"""Servers for the API contract tests: real ``kcr-trio serve`` processes with real sidecars.

``contract_server`` is parametrised over the backend sets we claim: the embedded defaults (memory
sessions, local files) and the production stores (a real redis-server and a real S3 server).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_on_stores

CONTRACT_ENV = {
    "MAX_EXECUTION_TIME": "4",
    "MAX_FILE_SIZE_MB": "1",
    "POD_POOL_PY": "2",
    "POD_POOL_JS": "1",
    "POD_POOL_BASH": "1",
    "KCR_SANDBOX": "auto",
}


@pytest.fixture(scope="module", params=["embedded", "redis-s3"])
def contract_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with server_on_stores(request.param, CONTRACT_ENV, name="contract") as server:
        yield server
