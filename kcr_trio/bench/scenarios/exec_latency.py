"""``exec-latency``: warm ``/exec`` latency of a hello-world program, per language.

Per run and language: ``--warmup`` untimed requests (pools warm, connection open), then up to
``--requests`` sequential timed requests on one kept-alive connection, bounded by ``--duration`` × 4.
"""

from __future__ import annotations

import trio

from kcr_trio.bench.client import HELLO, client, timed_exec
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target


class ExecLatency:
    name = "exec-latency"
    title = "Warm /exec latency per language (hello world, sequential)"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return list(opts.languages)

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        body = {"code": HELLO[step], "lang": step, "entity_id": "kcr-bench"}
        lat: list[float] = []
        errors = 0
        async with client(target, timeout=opts.timeout, connections=1) as c:
            for _ in range(opts.warmup):
                await timed_exec(c, body, "hi")
            with trio.move_on_after(max(opts.duration * 4, 10.0)):
                for _ in range(opts.requests):
                    out = await timed_exec(c, body, "hi")
                    if out.ok:
                        lat.append(out.ms)
                    else:
                        errors += 1
                        res.error(out.error or "error")
        res.samples["latency ms"] = lat
        res.figures.update({"p50 ms": percentile(lat, 50), "p95 ms": percentile(lat, 95),
                            "p99 ms": percentile(lat, 99), "errors": errors, "ok": len(lat)})
        return res
