"""``POST /exec/programmatic`` over raw HTTP against a real server: round trips, continuations, the
§2.5 error statuses, cancel and tombstones."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from tests.support.server import TEST_KEY, ServerProcess

H = {"X-API-Key": TEST_KEY}
WEATHER = {"name": "get-weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def post(server: ServerProcess, body: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = "/exec/programmatic") -> httpx.Response:
    resp = httpx.post(server.url + path, json=body, headers={**H, **(headers or {})}, timeout=60)
    return resp


def answer(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    return json.loads(resp.content.strip())


def results_for(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"call_id": c["id"], "result": {"city": c["input"]["city"], "n": len(c["input"]["city"])},
             "is_error": False} for c in calls]


def test_sequential_calls_print_once(ptc_server: ServerProcess) -> None:
    code = ("print('before')\nfor city in ['Oslo', 'Rome', 'Lima']:\n"
            "    r = await get_weather(city=city)\n    print(city, r['n'])\n")
    first = answer(post(ptc_server, {"code": code, "tools": [WEATHER], "timeout": 10000}))
    rounds = 0
    data = first
    while data["status"] == "tool_call_required":
        rounds += 1
        assert [c["name"] for c in data["tool_calls"]] == ["get-weather"]
        data = answer(post(ptc_server, {"continuation_token": data["continuation_token"],
                                        "tool_results": results_for(data["tool_calls"])}))
    assert rounds == 3
    assert data["status"] == "completed", data
    assert data["stdout"] == "before\nOslo 4\nRome 4\nLima 4\n"
    assert data["session_id"]


def test_gather_is_one_round_trip(ptc_server: ServerProcess) -> None:
    code = ("import asyncio\nrs = await asyncio.gather(*[get_weather(city=c) for c in ['a', 'bb', 'ccc', 'dddd', 'eeeee']])\n"
            "print(sum(r['n'] for r in rs))\n")
    data = answer(post(ptc_server, {"code": code, "tools": [WEATHER], "timeout": 10000}))
    assert data["status"] == "tool_call_required" and len(data["tool_calls"]) == 5
    assert [c["id"] for c in data["tool_calls"]] == [f"call_00{i}" for i in range(1, 6)]
    data = answer(post(ptc_server, {"continuation_token": data["continuation_token"],
                                    "tool_results": results_for(data["tool_calls"])}))
    assert data["status"] == "completed" and data["stdout"] == "15\n"


def fail_first_call(server: ServerProcess, first: dict[str, Any], message: str) -> dict[str, Any]:
    """Start ``first``, answer its first tool call with an error result, return the final answer."""
    data = answer(post(server, first))
    call = data["tool_calls"][0]
    return answer(post(server, {"continuation_token": data["continuation_token"], "tool_results": [
        {"call_id": call["id"], "result": None, "is_error": True, "error_message": message}]}))


def test_tool_error_raises_in_python(ptc_server: ServerProcess) -> None:
    code = "r = await get_weather(city='x')\nprint('unreachable')\n"
    data = fail_first_call(ptc_server, {"code": code, "tools": [WEATHER]}, "city unknown")
    assert data["status"] == "error" and data["error"] == "Sandbox exited with code 1"
    assert "ToolExecutionError: city unknown" in data["stderr"]
    assert "unreachable" not in data.get("stdout", "")


def test_timeout_is_the_active_run_time(ptc_server: ServerProcess) -> None:
    code = "r = await get_weather(city='a')\nprint('got', r['n'])\nwhile True:\n    pass\n"
    data = answer(post(ptc_server, {"code": code, "tools": [WEATHER], "timeout": 1500}))
    assert data["status"] == "tool_call_required"
    data = answer(post(ptc_server, {"continuation_token": data["continuation_token"],
                                    "tool_results": results_for(data["tool_calls"])}))
    assert data["status"] == "error" and data["error"] == "Time limit exceeded"


def test_cancel_during_a_run(ptc_server: ServerProcess) -> None:
    import threading

    request_id = str(uuid.uuid4())
    committed = threading.Event()
    box: dict[str, bytes] = {}
    code = "import time\ntime.sleep(30)\nprint(await get_weather(city='a'))\n"

    def run() -> None:
        with httpx.stream("POST", ptc_server.url + "/exec/programmatic", json={"code": code, "tools": [WEATHER]},
                          headers={**H, "X-LibreChat-Code-Request-ID": request_id}, timeout=60) as resp:
            committed.set()
            box["body"] = resp.read()

    thread = threading.Thread(target=run)
    thread.start()
    assert committed.wait(20)
    resp = post(ptc_server, {"request_id": request_id}, path="/exec/programmatic/cancel")
    assert resp.status_code == 202 and resp.json() == {"status": "cancellation_requested"}
    thread.join(20)
    assert not thread.is_alive()
    assert json.loads(box["body"]) == {"status": "error", "error": "Programmatic execution request cancelled"}
    # The request id is spent: a POST reusing it gets the cancelled error.
    resp = post(ptc_server, {"code": "print(1)", "tools": [WEATHER]}, {"X-LibreChat-Code-Request-ID": request_id})
    assert answer(resp)["error"] == "Programmatic execution request cancelled"


def test_bash_functions_and_background_batch(ptc_server: ServerProcess) -> None:
    code = (': &\nwait "$!"\necho start\n'
            'one=$(get_weather \'{"city":"Oslo"}\')\necho "$one" | jq -r .n\n'
            'get_weather \'{"city":"a"}\' > a.json & get_weather \'{"city":"bb"}\' > b.json & wait\n'
            'jq -s "map(.n) | add" a.json b.json\n')
    data = answer(post(ptc_server, {"lang": "bash", "code": code, "tools": [WEATHER], "timeout": 10000}))
    rounds = []
    while data["status"] == "tool_call_required":
        rounds.append(len(data["tool_calls"]))
        data = answer(post(ptc_server, {"continuation_token": data["continuation_token"],
                                        "tool_results": results_for(data["tool_calls"])}))
    assert rounds == [1, 2]
    assert data["status"] == "completed", data
    assert data["stdout"] == "start\n4\n3\n"
    # Generated files come back like /exec's.
    assert sorted(f["name"] for f in data["files"]) == ["a.json", "b.json"]


def test_bash_error_result_ends_the_script(ptc_server: ServerProcess) -> None:
    code = ': &\nwait "$!"\nx=$(get_weather \'{"city":"a"}\')\necho after\n'
    data = fail_first_call(ptc_server, {"lang": "bash", "code": code, "tools": [WEATHER]}, "no such city")
    assert data["status"] == "error" and data["error"] == "Sandbox exited with code 1"
    assert "no such city" in data["stderr"]
    assert "after" not in data.get("stdout", "")


def test_exec_accepts_timeout_in_ms(ptc_server: ServerProcess) -> None:
    resp = httpx.post(ptc_server.url + "/exec", json={"lang": "py", "code": "import time\ntime.sleep(5)\nprint('late')",
                                                      "timeout": 1500}, headers=H, timeout=60)
    data = json.loads(resp.content.strip())
    assert resp.status_code == 200 and "late" not in data["stdout"]
    assert "timed out after" in data["stderr"]  # whole seconds on the pod protocol
    resp = httpx.post(ptc_server.url + "/exec", json={"lang": "py", "code": "print(1)", "timeout": 999999999},
                      headers=H, timeout=60)
    assert json.loads(resp.content.strip())["stdout"] == "1\n"  # capped by MAX_EXECUTION_TIME, not refused
    resp = httpx.post(ptc_server.url + "/exec", json={"lang": "py", "code": "print(1)", "timeout": -5},
                      headers=H, timeout=60)
    # as the official /exec (contract §1.1): a value <= 0 is a 400 with its message, never a 422
    assert resp.status_code == 400
    assert json.loads(resp.content)["error"] == "timeout must be a positive number of milliseconds"


def test_cancel_of_a_continuation_invalidates_the_token(ptc_server: ServerProcess) -> None:
    import threading

    code = "import time\nw = await get_weather(city='a')\ntime.sleep(30)\nprint('never')\n"
    data = answer(post(ptc_server, {"code": code, "tools": [WEATHER]}))
    body = {"continuation_token": data["continuation_token"], "tool_results": results_for(data["tool_calls"])}
    request_id = str(uuid.uuid4())
    committed = threading.Event()
    box: dict[str, bytes] = {}

    def run() -> None:
        with httpx.stream("POST", ptc_server.url + "/exec/programmatic", json=body,
                          headers={**H, "X-LibreChat-Code-Request-ID": request_id}, timeout=60) as resp:
            committed.set()
            box["body"] = resp.read()

    thread = threading.Thread(target=run)
    thread.start()
    assert committed.wait(20)
    assert post(ptc_server, {"request_id": request_id}, path="/exec/programmatic/cancel").status_code == 202
    thread.join(20)
    assert json.loads(box["body"])["error"] == "Programmatic execution request cancelled"
    resp = post(ptc_server, body)
    assert resp.status_code == 404  # the execution is gone: its token no longer works


def test_input_files_are_mounted(ptc_server: ServerProcess) -> None:
    up = httpx.post(ptc_server.url + "/upload", files={"file": ("data.txt", b"hello from a file")}, headers=H,
                    timeout=30).json()
    ref = {"id": up["files"][0]["fileId"], "resource_id": up["files"][0]["fileId"], "name": "data.txt",
           "storage_session_id": up["session_id"], "kind": "user"}
    code = "w = await get_weather(city=open('/mnt/data/data.txt').read())\nprint(w['n'])\n"
    data = answer(post(ptc_server, {"code": code, "tools": [WEATHER], "files": [ref]}))
    assert data["tool_calls"][0]["input"] == {"city": "hello from a file"}
    data = answer(post(ptc_server, {"continuation_token": data["continuation_token"],
                                    "tool_results": results_for(data["tool_calls"])}))
    assert data["stdout"] == "17\n"
