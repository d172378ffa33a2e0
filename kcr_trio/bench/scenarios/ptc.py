"""``ptc``: programmatic tool calling, round trips and wall time of two workflows per target.

* ``seq3``: three sequential tool calls (each call's input depends on the previous result);
* ``gather5``: five calls under one ``asyncio.gather``.

The bench plays the client (contract §2.1): it answers every ``tool_calls`` entry at once, with no
tool latency, so the figures are the server's own cost. Compare a live target with a replay one
(``KCR_PTC_LIVE=false`` on a second server) to see what live suspension saves: a replay round
starts a fresh sandbox and re-runs the program from the top. Each workflow's stdout is checked, so a
wrong replay counts as an error. (The official server's Python stub would need five round trips for
``gather5``; both kcr-trio modes batch the gathered calls into one.)
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio

from kcr_trio.bench.client import client
from kcr_trio.bench.model import Context, StepResult
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target

FETCH = {"name": "fetch", "description": "Returns v = 10 * i",
         "parameters": {"type": "object", "properties": {"i": {"type": "integer"}}, "required": ["i"]}}
WORKFLOWS = {
    "seq3": ("print('start')\nv = 0\nfor _ in range(3):\n    v = (await fetch(i=v + 1))['v']\nprint(v)\n",
             "start\n1110\n", 3),
    "gather5": (("import asyncio\nprint('start')\nrs = await asyncio.gather(*[fetch(i=i) for i in range(5)])\n"
                 "print(sum(r['v'] for r in rs))\n"), "start\n100\n", 5),
}


async def run_workflow(c: httpx.AsyncClient, step: str) -> tuple[int, float]:
    """One workflow start to finish: ``(round trips, wall ms)``; raises on a wrong answer."""
    code, expected, calls = WORKFLOWS[step]
    started = time.perf_counter()
    body: dict[str, Any] = {"code": code, "tools": [FETCH], "timeout": 15000}
    rounds = issued = 0
    while True:
        resp = await c.post("/exec/programmatic", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:160]}")
        data = json.loads(resp.content)
        if data.get("status") != "tool_call_required":
            break
        rounds += 1
        issued += len(data["tool_calls"])
        body = {"continuation_token": data["continuation_token"], "tool_results": [
            {"call_id": call["id"], "result": {"v": 10 * int(call["input"]["i"])}, "is_error": False}
            for call in data["tool_calls"]]}
    wall = (time.perf_counter() - started) * 1000
    if data.get("status") != "completed" or data.get("stdout") != expected or issued != calls:
        raise RuntimeError(f"wrong result after {rounds} round trips ({issued} calls): {str(data)[:200]}")
    return rounds, wall


class Ptc:
    name = "ptc"
    title = "Programmatic tool calling: round trips and wall time (3 sequential calls, 5 under gather)"
    once = False

    def steps(self, opts: Any) -> list[str]:
        return list(WORKFLOWS)

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        walls: list[float] = []
        rounds: list[float] = []
        errors = 0
        async with client(target, timeout=opts.timeout, connections=1) as c:
            for _ in range(opts.warmup):
                try:
                    await run_workflow(c, step)
                except (RuntimeError, httpx.HTTPError, ValueError) as exc:
                    res.error(f"warm-up: {exc}")
            with trio.move_on_after(max(opts.duration * 4, 30.0)):
                for _ in range(max(1, min(opts.requests, 10))):
                    try:
                        trips, wall = await run_workflow(c, step)
                    except (RuntimeError, httpx.HTTPError, ValueError) as exc:
                        errors += 1
                        res.error(str(exc))
                        continue
                    rounds.append(trips)
                    walls.append(wall)
        res.samples["wall ms"] = walls
        res.figures.update({"round trips": percentile(rounds, 50), "wall p50 ms": percentile(walls, 50),
                            "wall p95 ms": percentile(walls, 95), "errors": errors, "ok": len(walls)})
        return res
