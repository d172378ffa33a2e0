"""Servers for the audit-finding tests: real ``kcr-trio serve`` processes with real sidecars.

``security_server`` runs the embedded stores and, as a second parameter, a real redis-server and a
real S3 server, so each data-integrity rule is checked against the backends we ship.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_on_stores

SECURITY_ENV = {
    "MAX_EXECUTION_TIME": "5",
    "MAX_FILE_SIZE_MB": "1",
    "POD_POOL_PY": "2",
    "POD_POOL_JS": "0",
    "POD_POOL_BASH": "0",
    "KCR_SANDBOX": "auto",
}


@pytest.fixture(scope="module", params=["embedded", "redis-s3"])
def security_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with server_on_stores(request.param, SECURITY_ENV, name="sec") as server:
        yield server
