"""The sidecar's live PTC channel (``sidecar/ptc.py``), driven over real HTTP with a real runner.

The run stays alive between batches: a print before the first call appears exactly once, calls made
under ``asyncio.gather`` or as bash background jobs arrive as one batch, and closing the stream
kills the run.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.sidecar import running_sidecar


async def _drive(client: httpx.AsyncClient, body: dict[str, Any], answer: Any) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """Run a PTC program, answering every batch with ``answer(call)``; return batches and result."""
    batches: list[list[dict[str, Any]]] = []
    async with client.stream("POST", "/ptc/start", json=body, timeout=60) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] == "done":
                return batches, event["result"]
            batches.append(event["calls"])
            results = {c["key"]: answer(c) for c in event["calls"]}
            r = await client.post("/ptc/results", json={"run": body["request_id"], "results": results})
            assert r.status_code == 200, r.text
    raise AssertionError("stream ended without a done event")


TOOLS = [{"name": "get-weather", "ident": "get_weather", "description": "Weather",
          "params": [{"name": "city", "required": True}]},
         {"name": "fail.tool", "ident": "failtool", "params": []}]


def _weather(call: dict[str, Any]) -> dict[str, Any]:
    if call["name"] == "fail.tool":
        return {"result": None, "is_error": True, "error_message": "boom from the client"}
    return {"result": {"city": call["input"]["city"], "temp": len(call["input"]["city"])}, "is_error": False}


async def test_python_sequential_gather_and_error() -> None:
    code = (
        "print('start')\n"
        "a = await get_weather(city='Oslo')\n"
        "print(a['temp'])\n"
        "import asyncio\n"
        "rs = await asyncio.gather(*[get_weather(city=c) for c in ['A', 'Bb', 'Ccc']])\n"
        "print([r['temp'] for r in rs])\n"
        "try:\n    await failtool()\nexcept ToolExecutionError as e:\n    print('caught', e)\n"
    )
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url) as client:
        body = {"lang": "python", "code": code, "tools": TOOLS, "timeout": 10, "lifetime": 60, "request_id": "r1"}
        batches, result = await _drive(client, body, _weather)
    assert [len(b) for b in batches] == [1, 3, 1], result["stderr"]
    assert result["exit_code"] == 0, result
    assert result["stdout"] == "start\n4\n[1, 2, 3]\ncaught boom from the client\n"


async def test_bash_background_jobs_are_one_batch() -> None:
    code = (": &\nwait \"$!\"\necho before\n"
            "get_weather '{\"city\":\"Oslo\"}' > one.json\n"
            "get_weather '{\"city\":\"A\"}' > a.json & get_weather '{\"city\":\"Bb\"}' > b.json & wait\n"
            "cat one.json a.json b.json\n"
            "failtool '{}'\necho not-reached\n")
    async with running_sidecar("bash") as sc, httpx.AsyncClient(base_url=sc.url) as client:
        body = {"lang": "bash", "code": code, "tools": TOOLS, "timeout": 10, "lifetime": 60,
                "settle": 0.1, "request_id": "r2"}
        batches, result = await _drive(client, body, _weather)
    assert [len(b) for b in batches] == [1, 2, 1]
    assert result["stdout"] == 'before\n{"city":"Oslo","temp":4}\n{"city":"A","temp":1}\n{"city":"Bb","temp":2}\n'
    assert result["exit_code"] == 1 and "boom from the client" in result["stderr"]


async def test_active_time_budget_excludes_waiting() -> None:
    code = "import time\nawait get_weather(city='x')\ntime.sleep(30)\n"
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url) as client:
        body = {"lang": "python", "code": code, "tools": TOOLS, "timeout": 1.5, "lifetime": 60, "request_id": "r3"}

        def slow_answer(call: dict[str, Any]) -> dict[str, Any]:
            return _weather(call)

        batches, result = await _drive(client, body, slow_answer)
    assert len(batches) == 1
    assert result["timed_out"] is True
