"""Servers for the API contract tests: real ``kcr-trio serve`` processes with real sidecars.

``contract_server`` is parametrised over the backend sets we claim: the embedded defaults (memory
sessions, local files) and the production stores (a real redis-server and a real S3 server).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import ServerProcess, server_process

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
    if request.param == "embedded":
        with server_process(CONTRACT_ENV) as server:
            yield server
        return
    from tests.support.redis_server import running_redis
    from tests.support.s3_server import running_s3

    with running_redis() as redis, running_s3() as s3:
        env = {
            **CONTRACT_ENV,
            **redis.env(prefix="contract:"),
            **s3.env(bucket="contract"),
            "KCR_SESSION_STORE": "redis",
            "KCR_FILE_STORE": "s3",
        }
        with server_process(env) as server:
            yield server
