"""``files-rps``: ``GET /files/{sid}?detail=summary`` requests per second (LibreChat's freshness check).

A session with one uploaded file is created once per target; then ``c`` workers list it back to back
for ``--duration`` seconds. A server that answers with ``Connection: close`` (kcr-trio's hang-up fix)
pays a new TCP connection per request; that cost is part of what this measures.
"""

from __future__ import annotations

import time

import httpx
import trio

from kcr_trio.bench.client import client, upload, uploaded_ref
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target


class FilesRps:
    name = "files-rps"
    title = "GET /files/{sid}?detail=summary requests per second"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"c={n}" for n in opts.files_concurrency]

    async def _session(self, ctx: Context, target: Target) -> str:
        key = ("files-rps-session", target.name)
        if key not in ctx.cache:
            async with client(target, timeout=ctx.opts.timeout) as c:
                r = await upload(c, "rps.csv", b"a,b\n1,2\n")
                if r.status_code != 200:
                    raise RuntimeError(f"upload for files-rps failed: HTTP {r.status_code} {r.text[:160]}")
                ctx.cache[key] = uploaded_ref(r)[0]
        ref: str = ctx.cache[key]
        return ref

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        conc = int(step[2:])
        sid = await self._session(ctx, target)
        lat: list[float] = []
        counts = {"errors": 0}
        budget = [opts.max_requests_per_window]
        async with client(target, timeout=opts.timeout, connections=conc) as c:
            start = time.perf_counter()
            end = trio.current_time() + opts.duration

            async def worker() -> None:
                while trio.current_time() < end and budget[0] > 0:
                    budget[0] -= 1
                    t0 = time.perf_counter()
                    try:
                        r = await c.get(f"/files/{sid}", params={"detail": "summary"})
                        ok = r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) >= 1
                    except (httpx.HTTPError, ValueError) as exc:
                        ok = False
                        res.error(f"{type(exc).__name__}: {exc}")
                    if ok:
                        lat.append((time.perf_counter() - t0) * 1000)
                    else:
                        counts["errors"] += 1

            with trio.move_on_after(opts.duration + opts.timeout):
                async with trio.open_nursery() as nursery:
                    for _ in range(conc):
                        nursery.start_soon(worker)
            wall = time.perf_counter() - start
        res.samples["latency ms"] = lat
        res.figures.update({"req/s": len(lat) / wall if wall > 0 else 0.0, "p50 ms": percentile(lat, 50),
                            "p99 ms": percentile(lat, 99), **counts, "ok": len(lat)})
        return res
