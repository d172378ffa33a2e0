"""``concurrency``: throughput and latency percentiles vs number of concurrent clients.

Per level ``c``: ``c`` workers send ``print('hi')`` back to back for ``--duration`` seconds (at most
``--max-requests-per-window`` requests in all). Throughput counts successful answers over the window;
busy answers (503) and errors are counted apart and excluded from latency.
"""

from __future__ import annotations

import time

import trio

from kcr_trio.bench.client import HELLO, client, timed_exec
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target


async def load_window(ctx: Context, target: Target, conc: int, res: StepResult, lang: str = "py") -> list[float]:
    """Run ``conc`` workers for the window; fill counts into ``res``; return latencies (ms)."""
    opts = ctx.opts
    body = {"code": HELLO[lang], "lang": lang, "entity_id": "kcr-bench"}
    lat: list[float] = []
    counts = {"errors": 0, "busy": 0}
    budget = [opts.max_requests_per_window]
    async with client(target, timeout=opts.timeout, connections=conc) as c:
        # Warm every connection of the pool first, so the window measures steady state.
        async with trio.open_nursery() as nursery:
            for _ in range(conc):
                nursery.start_soon(timed_exec, c, body, "hi")
        start = time.perf_counter()
        end = trio.current_time() + opts.duration

        async def worker() -> None:
            while trio.current_time() < end and budget[0] > 0:
                budget[0] -= 1
                out = await timed_exec(c, body, "hi")
                if out.ok:
                    lat.append(out.ms)
                elif out.status == 503:
                    counts["busy"] += 1
                else:
                    counts["errors"] += 1
                    res.error(out.error or "error")

        # Hard stop: the window plus one request timeout.
        with trio.move_on_after(opts.duration + opts.timeout):
            async with trio.open_nursery() as nursery:
                for _ in range(conc):
                    nursery.start_soon(worker)
        wall = time.perf_counter() - start
    res.figures.update({"req/s": len(lat) / wall if wall > 0 else 0.0, "p50 ms": percentile(lat, 50),
                        "p95 ms": percentile(lat, 95), "p99 ms": percentile(lat, 99), **counts, "ok": len(lat)})
    return lat


class Concurrency:
    name = "concurrency"
    title = "Concurrency sweep: throughput and p50/p95/p99 of print('hi') vs concurrent clients"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"c={n}" for n in opts.concurrency]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        res = StepResult()
        res.samples["latency ms"] = await load_window(ctx, target, int(step[2:]), res)
        return res
