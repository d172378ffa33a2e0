"""Where the Trio-native Redis client applies (``backends/redis_resp.native_target``), and its
request encoding; its behaviour against a real server is in tests/integration/stores/test_redis_native.py."""

from __future__ import annotations

import pytest

from kcr_trio.backends.redis_resp import NativeTarget, encode, native_target


@pytest.mark.parametrize(("url", "tls", "expected"), [
    ("redis://127.0.0.1:6380/0", False, NativeTarget("127.0.0.1", 6380, None, None, 0)),
    ("redis://redis", False, NativeTarget("redis", 6379, None, None, 0)),
    ("redis://:p%40ss@h:1/5", False, NativeTarget("h", 1, None, "p@ss", 5)),
    ("redis://user:pw@h/2", False, NativeTarget("h", 6379, "user", "pw", 2)),
    ("redis://h:1/0", True, None),  # REDIS_SSL: redis-py
    ("rediss://h:1/0", False, None),
    ("unix:///run/redis.sock", False, None),
    ("redis://h:1/0?protocol=3", False, None),  # options the native client does not implement
    ("redis://h:1/x", False, None),
])
def test_native_target(url: str, tls: bool, expected: NativeTarget | None) -> None:
    assert native_target(url, tls=tls) == expected


def test_encode_is_resp2_bulk_strings() -> None:
    assert encode(["EVALSHA", b"ab", 2, "é"]) == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$2\r\n\xc3\xa9\r\n"
