"""The close rule of ``api/connection_policy.py`` as a pure function."""

from __future__ import annotations

import pytest

from kcr_trio.api.connection_policy import closes_connection

LIBRECHAT = [(b"user-agent", b"LibreChat/1.0"), (b"x-api-key", b"k")]
AXIOS_UA = [(b"user-agent", b"axios/1.13.6"), (b"accept", b"application/json")]
AXIOS_ACCEPT = [(b"user-agent", b"my-node-app"), (b"accept", b"application/json, text/plain, */*")]
CURL = [(b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*")]


@pytest.mark.parametrize("path", ["/files/s", "/download/s/f", "/upload", "/upload/batch", "/sessions/s/objects/f"])
def test_axios_routes(path: str) -> None:
    for headers in (LIBRECHAT, AXIOS_UA, AXIOS_ACCEPT):
        assert closes_connection(path, headers)
    for headers in (CURL, [], [(b"accept", b"application/json")]):
        assert not closes_connection(path, headers)
        assert closes_connection(path, headers, clients="all")


@pytest.mark.parametrize("path", ["/exec", "/health", "/ready", "/exec/programmatic", "/metrics", "/filesx"])
def test_other_routes_never_close(path: str) -> None:
    for headers in (LIBRECHAT, AXIOS_UA, AXIOS_ACCEPT, CURL):
        assert not closes_connection(path, headers)
        assert not closes_connection(path, headers, clients="all")


def test_header_case_and_spacing() -> None:
    assert closes_connection("/files/s", [(b"user-agent", b"  librechat/2.0 ")])
    assert not closes_connection("/files/s", [(b"user-agent", b"NotLibreChat/1.0")])
