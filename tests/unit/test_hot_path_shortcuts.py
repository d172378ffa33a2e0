"""Per-request work moved out of the ``/files`` hot path (issue 18): each shortcut must give exactly
what the form it replaced gave."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from kcr_trio.api.auth import Authenticator
from kcr_trio.api.errors import dumps
from kcr_trio.api.principal import Principal
from kcr_trio.core.errors import Unauthorized
from kcr_trio.core.wire_shapes import iso_ms


@pytest.mark.parametrize("stamp", [
    dt.datetime(2026, 12, 5, 11, 58, 50, 173999, tzinfo=dt.UTC),
    dt.datetime(2026, 1, 1, 0, 0, 0, 0, tzinfo=dt.UTC),
    dt.datetime(2026, 6, 30, 23, 59, 59, 999, tzinfo=dt.timezone(dt.timedelta(hours=-7, minutes=-30))),
])
def test_iso_ms_is_the_strftime_form(stamp: dt.datetime) -> None:
    utc = stamp.astimezone(dt.UTC)
    assert iso_ms(stamp) == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("obj", [
    [{"name": "s/f", "lastModified": "2026-12-05T11:58:50.173Z"}],
    {"error": "Bad é \u2028 \"quoted\"", "n": [1, 2.5, None, True]},
    {"lone": "\udc80"},
])
def test_dumps_is_json_dumps_with_the_same_options(obj: object) -> None:
    expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    assert dumps(obj) == expected


def test_principal_of_a_key_is_the_hash_of_that_key() -> None:
    keys = ["key-one", "kéy-two"]
    auth = Authenticator(iter(keys))  # any iterable, read once
    for key in keys:
        assert auth.check(key) == Principal.for_key(key)
    with pytest.raises(Unauthorized):
        auth.check("key-three")
