"""``disconnect-storm``: clients leave mid-``/exec`` at random times. What did it cost the server?

Design (measurable against any contract server):

* Each run uploads one small file to make a session ``SID``, then starts ``--storm-clients`` raw
  ``POST /exec`` requests at once that reference it (so any output lands in ``SID``). Each program
  runs ``--storm-run-seconds``, appending a wall-clock stamp every 0.1 s to
  ``/mnt/data/storm-<token>.txt``; it first re-executes itself with the marker ``kcrbench-<run>-<i>``
  on its command line.
* Each client closes its socket at a uniformly random time in ``--storm-leave`` (default 0.5–3 s).
* **Capacity recovery**: right after the last client left, a probe sends ``print('ok')`` (retrying
  503s); recovery is the time from the last departure to its successful answer. A server that keeps
  running abandoned work answers only when those runs end.
* **Wasted execution seconds**, two ways:
  - *files* (any server): a server that lets abandoned runs finish stores their stamp files in
    ``SID``; the bench lists ``SID`` until the runs would have ended and sums
    ``last stamp - departure``. No stored file counts 0 (the run was stopped before output collection).
  - *proc* (targets on this machine): the marker's PID is found in ``/proc`` and held by a pidfd, so
    ``disconnect → process exit`` is timed exactly (``kill ms`` samples) and summed as waste.
* ``/metrics``: if the target exports Prometheus text, the change of every series about
  disconnects, cancellation, kills, busy or hang-ups is reported too.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import httpx
import trio

from kcr_trio.bench import metrics, procwatch
from kcr_trio.bench.client import client, timed_exec, upload, uploaded_ref
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.rawhttp import open_stream, request_head
from kcr_trio.bench.stats import percentile
from kcr_trio.bench.targets import Target

LOOP = """
import os, time
d = "/mnt/data" if os.access("/mnt/data", os.W_OK) else "."
end = time.time() + {secs}
with open(os.path.join(d, "storm-{tag}.txt"), "a") as f:
    while time.time() < end:
        f.write("%.3f\\n" % time.time())
        f.flush()
        time.sleep(0.1)
print("storm-done")
"""

STORM = """
import os, sys
LOOP = {loop!r}
sys.stdout.flush()
try:
    os.execv(sys.executable, [sys.executable, "-c", LOOP, {token!r}])
except OSError:
    exec(LOOP)
"""


def storm_code(run_id: str, i: int, secs: float) -> tuple[str, str]:
    tag = f"{run_id}-{i}"
    return STORM.format(loop=LOOP.format(secs=secs, tag=tag), token=f"kcrbench-{tag}"), f"storm-{tag}.txt"


@dataclass
class Client:
    index: int
    token: str
    filename: str
    leave_after: float
    sent_at: float = 0.0
    left_at: float | None = None  # trio time of the close
    left_wall: float | None = None  # epoch of the close
    completed: bool = False  # the whole answer arrived before the planned departure
    error: str | None = None
    status_line: str = ""
    answer_tail: str = ""  # the end of what the server sent (diagnoses an early answer)


async def storm_client(target: Target, c: Client, body: bytes) -> None:
    try:
        stream = await open_stream(target)
    except (OSError, trio.TooSlowError) as exc:
        c.error = f"connect: {exc}"
        return
    try:
        c.sent_at = trio.current_time()
        await stream.send_all(request_head(target, "POST", "/exec", length=len(body),
                                           content_type="application/json", close=True) + body)
        received = b""
        with trio.move_on_after(c.leave_after):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    c.completed = True
                    break
                received += data
        c.status_line = received.split(b"\r\n", 1)[0].decode("latin-1")
        c.answer_tail = received[-400:].decode("utf-8", "replace") if c.completed else ""
    except (OSError, trio.BrokenResourceError) as exc:
        c.error = f"{type(exc).__name__}: {exc}"
    finally:
        c.left_at, c.left_wall = trio.current_time(), time.time()
        await stream.aclose()


async def recovery_probe(target: Target, opts: Options, since: float) -> float | None:
    """Seconds from ``since`` until a fresh print('ok') succeeds; None if not within the bound."""
    async with client(target, timeout=opts.storm_run_seconds + 30, connections=1) as c:
        with trio.move_on_after(opts.storm_run_seconds + 30):
            while True:
                out = await timed_exec(c, {"code": "print('ok')", "lang": "py"}, "ok")
                if out.ok:
                    return trio.current_time() - since
                await trio.sleep(0.1)
    return None


async def stored_stamps(target: Target, opts: Options, sid: str, clients: list[Client], deadline: float,
                        watch: procwatch.ProcWatch | None) -> dict[str, float]:
    """Poll SID's listing until ``deadline``; last stamp of every storm file that appears."""
    wanted = {c.filename: c for c in clients if not c.completed}
    found: dict[str, float] = {}
    async with client(target, timeout=30, connections=1) as hc:
        while wanted.keys() - found.keys() and trio.current_time() < deadline:
            try:
                r = await hc.get(f"/files/{sid}", params={"detail": "full"})
                items = r.json() if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                items = []
            for item in items:
                name = item.get("name", "")
                if name in wanted and name not in found:
                    try:
                        d = await hc.get(f"/download/{sid}/{item.get('id')}")
                        lines = d.content.decode().split()
                        found[name] = float(lines[-1]) if lines else 0.0
                    except (httpx.HTTPError, ValueError, UnicodeDecodeError):
                        continue
            if watch is not None and watch.seen and all(s.exited_at is not None for s in watch.seen.values()):
                # Every program we saw is gone: give output collection a moment, then look once more.
                deadline = min(deadline, max(s.exited_at or 0.0 for s in watch.seen.values()) + 3.0)
            await trio.sleep(0.3)
    return found


class DisconnectStorm:
    name = "disconnect-storm"
    title = "Disconnect storm: clients leave mid-exec; wasted execution and capacity recovery"
    once = False

    def steps(self, opts: Options) -> list[str]:
        return [f"{opts.storm_clients} clients"]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        opts, res = ctx.opts, StepResult()
        async with client(target, timeout=opts.timeout) as hc:
            up = await upload(hc, "storm.txt", b"storm")
            if up.status_code != 200:
                raise RuntimeError(f"upload failed: HTTP {up.status_code} {up.text[:160]}")
            sid, fid, fname = uploaded_ref(up)
            before = await metrics.scrape(hc)
        run_id = secrets.token_hex(4)
        lo, hi = opts.storm_leave
        clients: list[Client] = []
        bodies: list[bytes] = []
        for i in range(opts.storm_clients):
            code, filename = storm_code(run_id, i, opts.storm_run_seconds)
            clients.append(Client(i, f"kcrbench-{run_id}-{i}", filename, ctx.rng.uniform(lo, hi)))
            bodies.append(json.dumps({"code": code, "lang": "py", "entity_id": "kcr-bench-storm",
                                      "files": [{"id": fid, "session_id": sid, "name": fname}]}).encode())
        use_proc = opts.proc_watch == "on" or (opts.proc_watch == "auto" and target.is_loopback)
        use_proc = use_proc and procwatch.available()
        watch = procwatch.ProcWatch(run_id) if use_proc else None
        start = trio.current_time()
        recovery: float | None = None
        stamps: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            if watch is not None:
                await nursery.start(watch.run)
            async with trio.open_nursery() as storm:
                for c, body in zip(clients, bodies, strict=True):
                    storm.start_soon(storm_client, target, c, body)
            last_left = max(c.left_at or start for c in clients)
            recovery = await recovery_probe(target, opts, last_left)
            deadline = start + hi + opts.storm_run_seconds + 5.0
            stamps = await stored_stamps(target, opts, sid, clients, deadline, watch)
            nursery.cancel_scope.cancel()
        async with client(target, timeout=opts.timeout) as hc:
            after = await metrics.scrape(hc)

        left = [c for c in clients if not c.completed and c.error is None]
        res.figures["left mid-run"] = len(left)
        res.figures["completed early"] = sum(c.completed for c in clients)
        res.figures["client errors"] = sum(c.error is not None for c in clients)
        res.figures["recovery s"] = recovery
        waste_files = [max(0.0, stamps[c.filename] - (c.left_wall or 0)) if c.filename in stamps else 0.0 for c in left]
        res.figures["wasted s (files)"] = sum(waste_files)
        res.figures["outputs stored"] = len(stamps)
        res.samples["departure s"] = [(c.left_at or start) - c.sent_at for c in left]
        if watch is not None:
            kills: list[float] = []
            still, never = 0, 0
            waste_proc = 0.0
            end = trio.current_time()
            for c in left:
                seen = watch.seen.get(c.token)
                if seen is None:
                    never += 1
                    continue
                if seen.exited_at is None:
                    still += 1
                    waste_proc += end - (c.left_at or end)
                    continue
                dt = seen.exited_at - (c.left_at or seen.exited_at)
                waste_proc += max(0.0, dt)
                if dt >= 0:
                    kills.append(dt * 1000)
            res.samples["kill ms"] = kills
            res.figures.update({"kill p50 ms": percentile(kills, 50), "kill p99 ms": percentile(kills, 99),
                                "wasted s (proc)": waste_proc, "never started": never,
                                "still running at end": still})
        for c in clients:
            if c.error:
                res.error(f"client {c.index}: {c.error}")
        d = metrics.delta(before, after)
        res.info["metrics_delta"] = metrics.interesting(d)
        counters = {k: v for k, v in res.info["metrics_delta"].items() if k.split("{")[0].endswith("_total")}
        for key, value in sorted(counters.items())[:8]:
            res.figures[f"metrics: {key}"] = value
        res.info["metrics"] = "prometheus" if d is not None else "unavailable"
        res.info["clients"] = [{"i": c.index, "leave_after": round(c.leave_after, 3), "completed": c.completed,
                                "status": c.status_line, "answer_tail": c.answer_tail, "error": c.error, "stamp": stamps.get(c.filename),
                                "left_wall": c.left_wall} for c in clients]
        return res
