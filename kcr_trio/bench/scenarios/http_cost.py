"""``http-cost``: the HTTP layer's price per request — req/s and server CPU per request, per route.

Routes (``--http-routes``): ``health`` (``GET /health``), ``files`` (``GET /files/{sid}?detail=summary``
on a session holding one file), ``upload-1k`` and ``upload-10m`` (``POST /upload``, one multipart
file part plus ``entity_id``), ``download-10m`` (``GET /download/{sid}/{fid}`` of a 10 MB file).
Each at every ``--http-concurrency`` level, for ``--duration`` seconds (keep it short for 10 MB
uploads: each stores a file; they are deleted again afterwards through the API).

Load comes from ``wrk -t1`` (see ``bench.wrk``); the runner interleaves targets at every step, so two
servers on one machine share its noise. Figures per run: ``req/s``, ``server CPU ms/req`` (the
process owning the target's listening socket, from ``/proc/<pid>/stat``; loopback targets only),
``client CPU ms/req`` (wrk itself), ``p50 ms``/``p99 ms``, ``peak RSS MiB`` and ``errors`` (socket
errors plus non-2xx answers). Every request sends the target's key, so all routes are authenticated
the way LibreChat calls them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import trio

from kcr_trio.bench import wrk
from kcr_trio.bench.client import client, upload, uploaded_ref
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.targets import Target

ROUTES = ("health", "files", "upload-1k", "upload-10m", "download-10m")
UPLOAD_SIZES = {"upload-1k": 1024, "upload-10m": 10 * 1000 * 1000}
DOWNLOAD_SIZE = 10 * 1000 * 1000
BOUNDARY = "kcrbenchboundary7MA4YWxkTrZu0gW"

# Collects the ids of what each upload stored, to delete it through the API afterwards.
_UPLOAD_LUA = """
ids = {}
response = function(status, headers, body)
  local sid = body and string.match(body, '"session_id":"([^"]+)"')
  local fid = body and string.match(body, '"fileId":"([^"]+)"')
  if sid and fid then ids[#ids + 1] = sid .. "/" .. fid end
end
setup = function(thread) threads = threads or {}; threads[#threads + 1] = thread end
"""
_UPLOAD_DONE_IDS = """
local base_done = done
done = function(summary, latency, requests)
  base_done(summary, latency, requests)
  for _, t in ipairs(threads or {}) do
    local list = t:get("ids")
    for _, id in ipairs(list or {}) do io.write("KCR_ID " .. id .. "\\n") end
  end
end
"""


def multipart_body(size: int) -> bytes:
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="entity_id"\r\n\r\nkcr-bench\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="bench.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


class HttpCost:
    name = "http-cost"
    title = "HTTP layer cost: req/s and server CPU per request (wrk)"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"{route} c={c}" for route in opts.http_routes for c in opts.http_concurrency]

    async def _setup(self, ctx: Context, target: Target) -> dict[str, str]:
        key = ("http-cost", target.name)
        if key not in ctx.cache:
            async with client(target, timeout=ctx.opts.timeout) as c:
                small = await upload(c, "rps.csv", b"a,b\n1,2\n")
                big = await upload(c, "big.bin", os.urandom(DOWNLOAD_SIZE)) if any(
                    r.startswith("download") for r in ctx.opts.http_routes) else None
            for r in (small, big):
                if r is not None and r.status_code != 200:
                    raise RuntimeError(f"setup upload failed: HTTP {r.status_code} {r.text[:160]}")
            sid, _, _ = uploaded_ref(small)
            ctx.cache[key] = {"files": f"/files/{sid}?detail=summary"}
            if big is not None:
                bsid, bfid, _ = uploaded_ref(big)
                ctx.cache[key]["download"] = f"/download/{bsid}/{bfid}"
        paths: dict[str, str] = ctx.cache[key]
        return paths

    def _body_file(self, ctx: Context, size: int) -> Path:
        key = ("http-cost-body", size)
        if key not in ctx.cache:
            fd, name = tempfile.mkstemp(prefix="kcr-bench-", suffix=".body")
            with os.fdopen(fd, "wb") as handle:
                handle.write(multipart_body(size))
            ctx.cache[key] = Path(name)
        path: Path = ctx.cache[key]
        return path

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        if not wrk.available():
            raise RuntimeError("http-cost needs wrk on PATH (apt-get install wrk)")
        opts, res = ctx.opts, StepResult()
        route, _, conc_text = step.partition(" c=")
        conc = int(conc_text)
        paths = await self._setup(ctx, target)
        headers = {**target.headers, "User-Agent": "kcr-trio-bench"}
        if route == "health":
            script, path = wrk.lua_script("GET", headers), "/health"
        elif route == "files":
            script, path = wrk.lua_script("GET", headers), paths["files"]
        elif route.startswith("download"):
            script, path = wrk.lua_script("GET", headers), paths["download"]
        elif route in UPLOAD_SIZES:
            body = self._body_file(ctx, UPLOAD_SIZES[route])
            headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
            script, path = wrk.lua_script("POST", headers, body) + _UPLOAD_LUA + _UPLOAD_DONE_IDS, "/upload"
        else:
            raise ValueError(f"unknown http-cost route {route!r}; choose from {', '.join(ROUTES)}")
        url = target.url + path
        if rep == 0 and opts.warmup:  # first contact: imports, pools, caches
            warm = await wrk.run_wrk(url, connections=conc, seconds=1, script=script)
            if route in UPLOAD_SIZES:
                await self._delete_uploads(target, warm, StepResult())
        pid = wrk.pid_listening_on(target.port) if target.is_loopback else None
        rss: list[float] = []
        async with trio.open_nursery() as nursery:
            if pid is not None:
                nursery.start_soon(wrk.sample_rss, pid, rss)
            cpu0 = wrk.cpu_seconds(pid) if pid is not None else None
            result = await wrk.run_wrk(url, connections=conc, seconds=opts.duration, script=script,
                                       timeout_s=opts.timeout)
            cpu1 = wrk.cpu_seconds(pid) if pid is not None else None
            nursery.cancel_scope.cancel()
        n = result.requests
        res.figures.update({
            "req/s": n / result.seconds if result.seconds > 0 else 0.0,
            "server CPU ms/req": (cpu1 - cpu0) * 1000 / n if cpu0 is not None and cpu1 is not None and n else None,
            "client CPU ms/req": result.client_cpu_s * 1000 / n if n else None,
            "p50 ms": result.p50_ms,
            "p99 ms": result.p99_ms,
            "peak RSS MiB": max(rss) if rss else None,
            "errors": result.socket_errors + result.bad_status,
            "ok": n - result.bad_status,
        })
        res.info["server_pid_found"] = pid is not None
        if result.socket_errors or result.bad_status:
            res.error(f"wrk: {result.raw}")
        if route in UPLOAD_SIZES:
            await self._delete_uploads(target, result, res)
        return res

    async def _delete_uploads(self, target: Target, result: wrk.WrkResult, res: StepResult) -> None:
        ids = result.ids
        async with client(target, timeout=30.0, connections=4) as c:
            failed = 0
            for ref in ids:
                try:
                    r = await c.delete(f"/files/{ref}")
                    failed += r.status_code >= 300
                except httpx.HTTPError:
                    failed += 1
        res.info["uploads_deleted"] = len(ids) - failed
