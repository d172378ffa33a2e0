"""``keepalive``: the LibreChat "socket hang up at 5 s" sequence with the real Node client.

Each run starts ``--keepalive-clients`` Node processes at once. Each does what LibreChat does: axios
``GET /files/{sid}?detail=summary`` (``timeout: 5000``, which leaves a destroy-on-timeout listener on
the pooled socket), then node-fetch ``POST /exec`` on the same socket with a program that prints
after ``--keepalive-seconds`` (> 5). A server that stays silent for 5 s on that socket loses the
request: ``hangup``. A heartbeating server, or one that closed the tainted socket, answers: ``ok``.
"""

from __future__ import annotations

from typing import Any

import trio

from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.node import classify, run_sequence
from kcr_trio.bench.targets import Target


def describe(r: dict[str, Any]) -> str:
    """What went wrong in one sequence: the client error, or the status and stderr of the answer."""
    if r.get("error"):
        return str(r["error"])[:300]
    raw = r.get("body")
    body: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return f"HTTP {r.get('status')}: stdout {str(body.get('stdout'))[:60]!r} stderr {str(body.get('stderr') or body.get('error'))[:200]!r}"


class KeepAlive:
    name = "keepalive"
    title = "LibreChat keep-alive sequence (axios GET, node-fetch POST /exec > 5 s): hang-ups"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"{opts.keepalive_seconds:g}s exec"]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        code = f"import time; time.sleep({opts.keepalive_seconds}); print('slept')"
        results: list[dict[str, Any]] = []

        async def one() -> None:
            results.append(await run_sequence(target, code, node_dir=opts.node_dir,
                                              timeout=opts.keepalive_seconds + 30))

        async with trio.open_nursery() as nursery:
            for _ in range(opts.keepalive_clients):
                nursery.start_soon(one)
        outcomes = [classify(r, "slept") for r in results]
        res.samples["elapsed ms"] = [float(r.get("elapsedMs", 0)) for r in results]
        res.samples["hang-up at ms"] = [float(r.get("elapsedMs", 0)) for r, o in zip(results, outcomes, strict=True) if o == "hangup"]
        for r, o in zip(results, outcomes, strict=True):
            if o != "ok":
                res.error(describe(r))
        res.info["results"] = [{"outcome": o, "elapsedMs": r.get("elapsedMs"), "status": r.get("status"),
                                "error": r.get("error") or (None if o == "ok" else describe(r)),
                                "sockets": r.get("sockets")} for r, o in zip(results, outcomes, strict=True)]
        res.figures.update({"hang-ups": outcomes.count("hangup"), "ok": outcomes.count("ok"),
                            "errors": outcomes.count("error")})
        return res
