"""Where the Trio-native Redis client applies (``backends/redis_resp.native_target``), and its
request encoding; its behaviour against a real server is in tests/integration/stores/test_redis_native.py."""

from __future__ import annotations

import pytest

from kcr_trio.backends.redis_resp import (
    NativeTarget,
    RespConnectionError,
    RespError,
    encode,
    native_target,
    parse,
)


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


REPLY = (b"*4\r\n*2\r\n$6\r\nh\xc3\xa9llo\r\n$-1\r\n:42\r\n+OK\r\n"
         b"*3\r\n$0\r\n\r\n-ERR bad\r\n*-1\r\n")


def test_parse_whole_reply_and_every_prefix_is_incomplete() -> None:
    value, end = parse(REPLY + b"+next\r\n", 0)  # type: ignore[misc]
    assert end == len(REPLY)
    assert value[:3] == [["héllo", None], 42, "OK"]
    assert value[3][0] == "" and isinstance(value[3][1], RespError) and str(value[3][1]) == "ERR bad"
    assert value[3][2] is None
    for cut in range(len(REPLY)):  # a reply cut anywhere is "read more", never a wrong value
        assert parse(REPLY[:cut], 0) is None
    again, end = parse(bytearray(b"xx" + REPLY), 2)  # type: ignore[misc]
    assert end == len(REPLY) + 2 and again[:3] == value[:3] and str(again[3][1]) == "ERR bad"


def test_parse_refuses_an_unknown_reply_type() -> None:
    with pytest.raises(RespConnectionError, match="protocol error"):
        parse(b"?what\r\n", 0)
