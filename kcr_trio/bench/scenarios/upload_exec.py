"""``upload-exec``: upload a file of a given size, then run code that reads it from ``/mnt/data``.

Sizes come from ``--sizes`` (1KB … 100MB; larger is refused by the CLI). The payload is random bytes
made once per size and reused. A ``413`` means the target's ``MAX_FILE_SIZE_MB`` is smaller than the
size: it is reported as ``rejected`` rather than as an error, so the operator sees the limit.
"""

from __future__ import annotations

import os
import time

import httpx

from kcr_trio.bench.client import client, timed_exec, upload, uploaded_ref
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target

# /mnt/data is where LibreChat's code reads uploads; fall back to the working directory for servers
# that mount inputs there instead (a local executor without a sandbox wrapper).
READ_SIZE = ("import os; p = '/mnt/data/{name}'; p = p if os.path.exists(p) else '{name}'; "
             "print(len(open(p, 'rb').read()))")


def human_size(n: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


class UploadExec:
    name = "upload-exec"
    title = "Upload a file, then /exec reading it (per size)"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [human_size(s) for s in opts.sizes]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        size = parse_size(step)
        data = ctx.cache.get(("payload", size))
        if data is None:
            data = ctx.cache[("payload", size)] = os.urandom(size)
        up_ms: list[float] = []
        ex_ms: list[float] = []
        total: list[float] = []
        counts = {"errors": 0, "rejected": 0}
        timeout = max(opts.timeout, 30.0 + size / (1024 * 1024))  # allow ≥ 1 MB/s
        async with client(target, timeout=timeout, connections=2) as c:
            for _ in range(opts.uploads_per_run):
                t0 = time.perf_counter()
                try:
                    r = await upload(c, "bench.bin", data)
                except httpx.HTTPError as exc:
                    counts["errors"] += 1
                    res.error(f"upload: {type(exc).__name__}: {exc}")
                    continue
                t1 = time.perf_counter()
                if r.status_code == 413:
                    counts["rejected"] += 1
                    res.info["rejected"] = f"HTTP 413: {r.text[:160]}"
                    break  # the limit will not change within this run
                if r.status_code != 200:
                    counts["errors"] += 1
                    res.error(f"upload: HTTP {r.status_code} {r.text[:160]}")
                    continue
                sid, fid, name = uploaded_ref(r)
                out = await timed_exec(c, {"code": READ_SIZE.format(name=name), "lang": "py",
                                           "files": [{"id": fid, "session_id": sid, "name": name}]}, str(size))
                if not out.ok:
                    counts["errors"] += 1
                    res.error(f"exec: {out.error}")
                    continue
                up_ms.append((t1 - t0) * 1000)
                ex_ms.append(out.ms)
                total.append((t1 - t0) * 1000 + out.ms)
        res.samples.update({"upload ms": up_ms, "exec ms": ex_ms, "total ms": total})
        up50 = percentile(up_ms, 50)
        res.figures.update({
            "upload p50 ms": up50, "exec p50 ms": percentile(ex_ms, 50),
            "total p50 ms": percentile(total, 50), "total p99 ms": percentile(total, 99),
            "upload MB/s": (size / (1024 * 1024)) / (up50 / 1000) if up50 is not None else None,
            **counts, "ok": len(total),
        })
        return res
