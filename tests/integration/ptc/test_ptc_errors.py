"""Every error status of contract §2.5 (and §1.4/§2.6 for cancel), over raw HTTP to a real server.

400 bad input · 403 another principal · 404 unknown or expired execution · 409 concurrent
continuation, a different re-sent result, a reused request id · 413 too large · 503 store down.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.ptc.conftest import OTHER_KEY, PTC_ENV
from tests.integration.ptc.test_ptc_http import WEATHER, answer, post, results_for
from tests.support.server import TEST_KEY, ServerProcess, server_process


def first_round(server: ServerProcess, code: str = "r = await get_weather(city='Oslo')\nprint(r)\n") -> dict[str, Any]:
    data = answer(post(server, {"code": code, "tools": [WEATHER], "timeout": 10000}))
    assert data["status"] == "tool_call_required"
    return data


def cont(server: ServerProcess, token: str, results: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return post(server, {"continuation_token": token, "tool_results": results}, headers)


def rid() -> str:
    return str(uuid.uuid4())


@pytest.mark.parametrize("body", [
    {"code": "print(1)", "tools": []},
    {"code": "", "tools": [WEATHER]},
    {"code": "print(1)", "tools": [WEATHER], "timeout": 0},
    {"code": "print(1)", "tools": [WEATHER], "timeout": "soon"},
    {"code": "print(1)", "tools": [WEATHER], "lang": "ruby"},
    {"code": "print(1)", "tools": [{"name": "a-b"}, {"name": "a_b"}]},
    {"code": "print(1)", "tools": [{"name": f"t{i}"} for i in range(101)]},
])
def test_first_request_400(ptc_server: ServerProcess, body: dict[str, Any]) -> None:
    resp = post(ptc_server, body)
    assert resp.status_code == 400, resp.text
    assert isinstance(resp.json()["error"], str)


def test_continuation_400s(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server)
    token, call = data["continuation_token"], data["tool_calls"][0]
    ok = {"call_id": call["id"], "result": "sunny", "is_error": False}
    cases = [
        (token, []),
        (token, None),
        (5, [ok]),
        (token, [{**ok, "call_id": "weird"}]),
        (token, [{"call_id": call["id"], "is_error": False}]),
        (token, [{**ok, "is_error": "no"}]),
        (token, [{**ok, "is_error": True, "error_message": 5}]),
        (token, [ok, ok]),
        (token, [{**ok, "call_id": "call_999"}]),
        (token, [ok] * 201),
    ]
    for tok, results in cases:
        resp = cont(ptc_server, tok, results)
        assert resp.status_code == 400, (tok, results, resp.text)
    # The execution survived all of that: the right answer still completes it.
    done = answer(cont(ptc_server, token, [ok]))
    assert done["status"] == "completed" and done["stdout"] == "sunny\n"


def test_missing_result_for_an_issued_call_is_400(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server, "import asyncio\nprint(await asyncio.gather(get_weather(city='a'), get_weather(city='b')))\n")
    assert len(data["tool_calls"]) == 2
    partial = results_for(data["tool_calls"])[:1]
    assert cont(ptc_server, data["continuation_token"], partial).status_code == 400
    done = answer(cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"])))
    assert done["status"] == "completed"


def test_other_principal_403(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server)
    resp = cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"]), {"X-API-Key": OTHER_KEY})
    assert resp.status_code == 403
    # A cancel by another principal is refused too.
    request_id = rid()
    slow = first_round_with_rid(ptc_server, request_id)
    resp = post(ptc_server, {"request_id": request_id}, {"X-API-Key": OTHER_KEY}, path="/exec/programmatic/cancel")
    assert resp.status_code == 403 and resp.json()["error"] == "Programmatic request belongs to another principal"
    assert answer(cont(ptc_server, slow["continuation_token"], results_for(slow["tool_calls"])))["status"] == "completed"


def first_round_with_rid(server: ServerProcess, request_id: str) -> dict[str, Any]:
    data = answer(post(server, {"code": "print(await get_weather(city='x'))", "tools": [WEATHER]},
                       {"X-LibreChat-Code-Request-ID": request_id}))
    assert data["status"] == "tool_call_required"
    return data


def test_unknown_execution_404(ptc_server: ServerProcess) -> None:
    unknown = base64.urlsafe_b64encode(json.dumps({"e": "nope", "g": 1, "n": "x"}).encode()).decode()
    for token in (unknown, "not-a-token", base64.urlsafe_b64encode(b'{"x":1}').decode()):
        resp = cont(ptc_server, token, [{"call_id": "call_001", "result": 1, "is_error": False}])
        assert resp.status_code == 404 and resp.json()["error"] == "Execution not found or expired"
    # A token from the future of a live execution is not one we issued either.
    data = first_round(ptc_server)
    raw = json.loads(base64.urlsafe_b64decode(data["continuation_token"] + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**raw, "g": raw["g"] + 5}).encode()).decode()
    assert cont(ptc_server, forged, results_for(data["tool_calls"])).status_code == 404
    assert answer(cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"])))["status"] == "completed"


def test_resend_identical_ok_different_409(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server, "a = await get_weather(city='a')\nb = await get_weather(city='bb')\nprint(a['n'], b['n'])\n")
    token1 = data["continuation_token"]
    results1 = results_for(data["tool_calls"])
    second = answer(cont(ptc_server, token1, results1))
    assert second["status"] == "tool_call_required" and second["tool_calls"][0]["id"] == "call_002"
    # Identical re-send of round 1 (a client retry): accepted, answers the current round again.
    again = answer(cont(ptc_server, token1, results1))
    assert again == second
    # The same call with a different payload: 409.
    changed = [{**results1[0], "result": {"city": "a", "n": 99}}]
    assert cont(ptc_server, token1, changed).status_code == 409
    done = answer(cont(ptc_server, second["continuation_token"], results_for(second["tool_calls"])))
    assert done["stdout"] == "1 2\n"
    # After completion an identical re-send returns the final answer again.
    assert answer(cont(ptc_server, second["continuation_token"], results_for(second["tool_calls"]))) == done


def test_concurrent_continuation_409(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server, "import time\nr = await get_weather(city='a')\ntime.sleep(3)\nprint('done')\n")
    body = {"continuation_token": data["continuation_token"], "tool_results": results_for(data["tool_calls"])}
    committed = threading.Event()
    box: dict[str, bytes] = {}

    def first() -> None:
        # The run sleeps past the heartbeat grace, so the 200 head arrives while it still holds
        # the execution: that is the moment a second continuation must be refused.
        with httpx.stream("POST", ptc_server.url + "/exec/programmatic", json=body, headers={"X-API-Key": TEST_KEY},
                          timeout=60) as resp:
            committed.set()
            box["body"] = resp.read()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert committed.wait(20)
        resp = cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"]))
        assert resp.status_code == 409 and "in progress" in resp.json()["error"]
    finally:
        thread.join(30)
    assert json.loads(box["body"])["stdout"] == "done\n"


def test_request_id_reuse_409_and_bad_id_400(ptc_server: ServerProcess) -> None:
    request_id = rid()
    data = first_round_with_rid(ptc_server, request_id)
    resp = post(ptc_server, {"code": "print(1)", "tools": [WEATHER]}, {"X-LibreChat-Code-Request-ID": request_id})
    assert resp.status_code == 409 and resp.json()["error"] == "Programmatic request ID is already in use"
    resp = post(ptc_server, {"code": "print(1)", "tools": [WEATHER]}, {"X-LibreChat-Code-Request-ID": "short"})
    assert resp.status_code == 400
    resp = post(ptc_server, {"request_id": "bad id!"}, path="/exec/programmatic/cancel")
    assert resp.status_code == 400
    answer(cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"])))


def test_too_large_413(ptc_server: ServerProcess) -> None:
    data = first_round(ptc_server)
    big = "x" * (5 * 1024 * 1024 + 10)
    resp = cont(ptc_server, data["continuation_token"],
                [{"call_id": data["tool_calls"][0]["id"], "result": big, "is_error": False}])
    assert resp.status_code == 413
    resp = httpx.post(ptc_server.url + "/exec/programmatic", content=b"{" + b" " * (30 * 1024 * 1024) + b"}",
                      headers={"X-API-Key": TEST_KEY, "content-type": "application/json"}, timeout=60)
    assert resp.status_code == 413


def test_cancel_tombstone_then_post(ptc_server: ServerProcess) -> None:
    request_id = rid()
    resp = post(ptc_server, {"request_id": request_id}, path="/exec/programmatic/cancel")
    assert resp.status_code == 202 and resp.json() == {"status": "cancellation_requested"}
    resp = post(ptc_server, {"code": "print(1)", "tools": [WEATHER]}, {"X-LibreChat-Code-Request-ID": request_id})
    assert answer(resp) == {"status": "error", "error": "Programmatic execution request cancelled"}


def test_cancel_suspended_execution_invalidates_token(ptc_server: ServerProcess) -> None:
    request_id = rid()
    data = first_round_with_rid(ptc_server, request_id)
    # The POST is answered, so cancel says already_completed; a cancel of the continuation's id
    # while it runs is what stops the execution (see the Node test); here: cancel by a fresh id of
    # an in-flight continuation.
    assert post(ptc_server, {"request_id": request_id}, path="/exec/programmatic/cancel").json() == \
        {"status": "already_completed"}
    assert answer(cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"])))["status"] == "completed"


def test_store_down_503() -> None:
    from tests.support.redis_server import running_redis

    with running_redis() as redis, server_process({**PTC_ENV, **redis.env(prefix="ptc503:"),
                                                   "KCR_SESSION_STORE": "redis"}) as server:
        data = first_round(server)
        redis.stop()
        # The request id cannot be recorded: 503, and nothing was consumed.
        resp = cont(server, data["continuation_token"], results_for(data["tool_calls"]),
                    {"X-LibreChat-Code-Request-ID": rid()})
        assert resp.status_code == 503, resp.text
        resp = post(server, {"code": "print(1)", "tools": [WEATHER]})
        assert resp.status_code == 503, resp.text
        # A live execution needs no store to continue: the run is still suspended in its sandbox.
        resp = cont(server, data["continuation_token"], results_for(data["tool_calls"]))
        assert answer(resp)["status"] == "completed"


def test_attached_workspace_is_a_capability_error(ptc_server: ServerProcess) -> None:
    resp = post(ptc_server, {"lang": "bash", "code": ": &\nwait \"$!\"\nls", "tools": []},
                {"X-LibreChat-Code-Workspace-ID": "proj-1"})
    assert resp.status_code == 409 and resp.json()["error"] == "unsupported_capability"


def test_body_key_bounded_like_exec(ptc_server: ServerProcess) -> None:
    """A request whose key is only in its JSON body is read before it is authenticated: the PTC
    routes share the edge's body reader, so it is bounded like ``/exec``'s (KCR_UNAUTH_BODY_BYTES,
    256 KiB by default) and still authenticated by that key when it is small."""
    small = {"code": "r = await get_weather(city='Oslo')\nprint(r)\n", "tools": [WEATHER], "api_key": TEST_KEY}
    data = answer(httpx.post(ptc_server.url + "/exec/programmatic", json=small, timeout=60))
    assert data["status"] == "tool_call_required"
    answer(cont(ptc_server, data["continuation_token"], results_for(data["tool_calls"])))
    big = {**small, "code": "#" + "x" * (300 * 1024) + "\nprint(1)\n"}
    resp = httpx.post(ptc_server.url + "/exec/programmatic", json=big, timeout=60)
    assert resp.status_code == 413, resp.text
    assert "before the API key is checked" in resp.json()["error"]
    wrong = httpx.post(ptc_server.url + "/exec/programmatic", json={**small, "api_key": "wrong-key-0123456789"},
                       timeout=60)
    assert wrong.status_code == 401
