"""Pure PTC logic: the §2.3 identifier rules, tokens, result validation and replay matching."""

from __future__ import annotations

import pytest

from kcr_trio.core.errors import ApiError
from kcr_trio.core.ptc_names import bash_identifier, identifiers, python_identifier
from kcr_trio.core.ptc_state import (
    PtcState,
    Replayer,
    apply_results,
    parse_results,
    parse_start,
    parse_timeout,
    parse_token,
)


@pytest.mark.parametrize(("name", "py", "sh"), [
    ("get-weather", "get_weather", "get_weather"),
    ("mcp.server tool", "mcpserver_tool", "mcp_server_tool"),
    ("9lives", "_9lives", "_9lives"),
    ("class", "class_tool", "class"),
    ("wait", "wait", "wait_tool"),
    ("done", "done", "done_tool"),
    ("_ptc_x", "_ptc_x", "_ptc_x_tool"),
    ("a$b", "ab", "ab"),
])
def test_identifier_rules(name: str, py: str, sh: str) -> None:
    assert python_identifier(name) == py
    assert bash_identifier(name) == sh


def test_collisions_are_refused() -> None:
    with pytest.raises(ValueError):
        identifiers(["a-b", "a_b"], "python")
    with pytest.raises(ValueError):
        identifiers(["a.b", "a_b"], "bash")
    assert identifiers(["a.b", "a_b"], "python") == {"a.b": "ab", "a_b": "a_b"}


def test_timeout_ms_capped() -> None:
    assert parse_timeout(15000, 30) == 15.0
    assert parse_timeout(10**9, 30) == 30.0
    assert parse_timeout(None, 30) == 30.0
    for bad in (0, -1, "x", True, float("nan")):
        with pytest.raises(ApiError):
            parse_timeout(bad, 30)


def state() -> PtcState:
    start = parse_start({"code": "x", "tools": [{"name": "t"}]}, 30)
    s = PtcState("e1", "p", start.lang, start.code, start.tools, start.timeout, None, [])
    s.new_call("t", {"a": 1})
    s.new_call("t", {"a": 1})
    return s


def test_token_round_trip_and_garbage() -> None:
    s = state()
    token = s.issue(now=0)
    assert parse_token(token) == ("e1", 1, s.nonce)
    for bad in ("", "!!", "eyJ4IjoxfQ"):
        with pytest.raises(ApiError):
            parse_token(bad)


def test_results_exactly_once_and_resends() -> None:
    s = state()
    both = parse_results([{"call_id": "call_001", "result": 1, "is_error": False},
                          {"call_id": "call_002", "result": 2, "is_error": False}])
    with pytest.raises(ApiError) as missing:
        apply_results(s, both[:1])
    assert missing.value.status == 400
    assert [c.id for c in apply_results(s, both)] == ["call_001", "call_002"]
    assert apply_results(s, both) == []  # an identical re-send records nothing
    with pytest.raises(ApiError) as changed:
        apply_results(s, parse_results([{"call_id": "call_001", "result": 9, "is_error": False}]))
    assert changed.value.status == 409


def test_replay_matches_by_input_and_occurrence() -> None:
    s = state()
    r = Replayer(s.calls)
    first, second = r.match("t", {"a": 1}), r.match("t", {"a": 1})
    assert (first and first.id, second and second.id) == ("call_001", "call_002")
    assert r.match("t", {"a": 1}) is None and Replayer(s.calls).match("t", {"a": 2}) is None


def test_state_survives_json() -> None:
    s = state()
    s.issue(now=0)
    again = PtcState.from_json(s.to_json())
    assert again == s
