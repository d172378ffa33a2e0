"""Execution-engine benchmark: ``kcr-trio bench engine --url URL --key-env VAR [...]``.

Against one running server, or several side by side (``--url base=URL --url new=URL``: rounds and
windows alternate between them, so machine noise hits all alike; the operator starts them, nothing
here starts or tunes them), for each language of ``--langs`` (default py, js, bash):

* **latency**: ``/exec`` of a trivial print at c=1, interleaved round by round with a bare start of
  the same interpreter binary (its real path: ``python3`` resolved past any version-manager shim),
  so machine noise hits both alike; p50/p99 of each and the ratio of the p50s;
* **throughput**: exec/s at each concurrency of ``--conc`` (default 1,4,8,16) over ``--window``
  seconds (default 20), counting errors and busy answers (503) separately from successes;
* **idle CPU**: with ``--server-pid`` (or found from the URL's port on this machine), the CPU the
  server and every process below it used over ``--idle`` seconds of no requests, and how many of
  those processes were replaced meanwhile (warm interpreters that die and respawn while idle).

Every loop is bounded by a count and a deadline. Output: a table on stdout and, with ``--json``, the
raw figures. A speed goal lives here, never in a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .lean import LeanClient

PROGRAMS = {"py": "print('hi')", "js": "console.log('hi')", "bash": "echo hi"}
BARE = {"py": ["-c", "print('hi')"], "js": ["-e", "console.log('hi')"], "bash": ["-c", "echo hi"]}
BINARIES = {"py": "python3", "js": "node", "bash": "bash"}
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def real_binary(lang: str, python: str | None) -> str:
    """The interpreter's real path, as the sandbox runs it: ``python3`` is the one on the fixed
    PATH the sidecar gives user code (not a version-manager shim on the operator's PATH); asked
    for ``sys.executable`` so a shim there still resolves to the real binary."""
    if lang == "py":
        exe = python or shutil.which("python3", path=SAFE_PATH) or sys.executable
        out = subprocess.run([exe, "-c", "import sys, os; print(os.path.realpath(sys.executable))"],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()
    found = shutil.which(BINARIES[lang], path=SAFE_PATH)
    if not found:
        raise SystemExit(f"bench engine: {BINARIES[lang]} not found")
    return os.path.realpath(found)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


# What a latency round talks through: httpx, or the lean client (``bench/lean.py``).
Client = httpx.AsyncClient | LeanClient


@dataclass
class Tally:
    ok: int = 0
    errors: int = 0
    busy: int = 0
    wrong: int = 0  # 200 with an unexpected stdout or non-empty stderr
    latencies: list[float] = field(default_factory=list)


async def one_exec(client: Client, lang: str, tally: Tally) -> float:
    started = time.perf_counter()
    try:
        resp = await client.post("/exec", json={"lang": lang, "code": PROGRAMS[lang]})
    except httpx.HTTPError:
        tally.errors += 1
        return time.perf_counter() - started
    elapsed = time.perf_counter() - started
    if resp.status_code == 503:
        tally.busy += 1
    elif resp.status_code != 200:
        tally.errors += 1
    else:
        try:
            body = json.loads(resp.content)
        except ValueError:
            tally.errors += 1
            return elapsed
        if body.get("stdout") == "hi\n" and not body.get("stderr"):
            tally.ok += 1
            tally.latencies.append(elapsed)
        else:
            tally.wrong += 1
    return elapsed


async def one_health(client: Client) -> float:
    """Seconds for one ``GET /health`` (NaN if it failed: it then counts as no sample)."""
    started = time.perf_counter()
    try:
        resp = await client.get("/health")
    except httpx.HTTPError:
        return float("nan")
    return time.perf_counter() - started if resp.status_code == 200 else float("nan")


def bare_start(binary: str, lang: str) -> float:
    started = time.perf_counter()
    subprocess.run([binary, *BARE[lang]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"}, timeout=60, check=False)
    return time.perf_counter() - started


async def throughput(client: httpx.AsyncClient, lang: str, conc: int, window: float,
                     pid: int | None = None) -> dict[str, Any]:
    """exec/s over ``window`` seconds at ``conc``; with ``pid`` (the server), also the CPU its
    whole process tree used per successful exec (robust to other load on the machine)."""
    tally = Tally()
    before = await trio.to_thread.run_sync(tree, pid) if pid is not None else None
    end = trio.current_time() + window

    async def worker() -> None:
        while trio.current_time() < end:
            await one_exec(client, lang, tally)

    started = time.perf_counter()
    with trio.move_on_after(window + 60):  # a request still running at the end is let finish
        async with trio.open_nursery() as nursery:
            for _ in range(conc):
                nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    lat = [v * 1000 for v in tally.latencies]
    row = {"concurrency": conc, "seconds": round(elapsed, 2), "ok": tally.ok,
           "exec_per_s": round(tally.ok / elapsed, 2), "errors": tally.errors, "wrong": tally.wrong,
           "busy": tally.busy, "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1)}
    if pid is not None and before is not None and tally.ok:
        after = await trio.to_thread.run_sync(tree, pid)
        row["server_cpu_ms_per_exec"] = round(_used(before, after) / os.sysconf("SC_CLK_TCK")
                                              * 1000 / tally.ok, 1)
    return row


def _used(before: dict[int, int], after: dict[int, int]) -> int:
    """CPU ticks of processes alive at both ends, plus all of new ones (with what they reaped)."""
    return sum(after[p] - before[p] for p in after if p in before) + sum(
        after[p] for p in after if p not in before)


# --- idle CPU -----------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(own + reaped children's CPU ticks, parent pid) of one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            rest = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in rest[11:15]), int(rest[1])


def tree(root: int) -> dict[int, int]:
    """{pid: cpu ticks} for ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            got = _stat(int(entry))
            if got is not None:
                ticks[int(entry)], parents[int(entry)] = got
    out = {root: ticks.get(root, 0)}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in out and pid not in out:
                out[pid] = ticks[pid]
                changed = True
    return out


def pid_of_port(port: int) -> int | None:
    """The pid listening on a local TCP port (``/proc/net/tcp*`` inode → ``/proc/*/fd``)."""
    inodes: set[str] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                for line in fh.readlines()[1:]:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


async def idle_cpu(pid: int, seconds: float) -> dict[str, Any]:
    hz = os.sysconf("SC_CLK_TCK")
    before = tree(pid)
    started = time.perf_counter()
    await trio.sleep(seconds)
    after = tree(pid)
    elapsed = time.perf_counter() - started
    used = _used(before, after)  # includes what the survivors reaped meanwhile (cutime)
    return {"seconds": round(elapsed, 1), "cpu_percent": round(100 * used / hz / elapsed, 2),
            "processes_before": len(before), "processes_after": len(after),
            "replaced": len(set(before) - set(after)), "new": len(set(after) - set(before))}


# --- main ---------------------------------------------------------------------------------------
def parse_targets(urls: list[str]) -> list[tuple[str, str]]:
    """``[NAME=]URL`` for each ``--url``; unnamed targets are called by their position."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(urls):
        name, sep, url = item.partition("=")
        if not sep or "://" in name:
            name, url = (f"t{i + 1}" if len(urls) > 1 else "server"), item
        if name in {n for n, _ in out}:
            raise SystemExit(f"bench engine: two targets named {name!r}")
        out.append((name, url))
    return out


def _rotated(items: list[Any], i: int) -> list[Any]:
    """Each round starts with the next target: no target always runs right after a bare start."""
    k = i % len(items)
    return items[k:] + items[:k]


async def latency_interleaved(clients: Mapping[str, Client], lang: str, binary: str, rounds: int,
                              deadline: float) -> dict[str, dict[str, Any]]:
    """p50/p99 of ``/exec`` on every target and of a bare start, round by round interleaved.

    Each round also times a ``GET /health`` with the same client on the same connection: the floor
    any HTTP answer of that server costs this client (its own cost included), against which a
    target of a fraction of a bare start must be read (for bash, 0.25x of a bare start is below it).
    """
    tallies = {name: Tally() for name in clients}
    health: dict[str, list[float]] = {name: [] for name in clients}
    bare: list[float] = []
    for i in range(rounds):
        if trio.current_time() > deadline:
            break
        for name in _rotated(list(clients), i):
            await one_exec(clients[name], lang, tallies[name])
            bare.append(await trio.to_thread.run_sync(bare_start, binary, lang))
            health[name].append(await one_health(clients[name]))
    bare_ms = [v * 1000 for v in bare]
    p50_bare = pct(bare_ms, 50)
    out = {}
    for name, tally in tallies.items():
        exec_ms = [v * 1000 for v in tally.latencies]
        p50_exec = pct(exec_ms, 50)
        out[name] = {"rounds": len(bare) // len(clients), "ok": tally.ok, "errors": tally.errors + tally.wrong,
                     "busy": tally.busy, "exec_p50_ms": round(p50_exec, 1),
                     "exec_p99_ms": round(pct(exec_ms, 99), 1), "bare_p50_ms": round(p50_bare, 1),
                     "bare_p99_ms": round(pct(bare_ms, 99), 1),
                     "health_p50_ms": round(pct([v * 1000 for v in health[name] if v == v], 50), 2),
                     "ratio_p50": round(p50_exec / p50_bare, 3) if bare_ms and exec_ms else None,
                     "binary": binary}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    key = os.environ.get(args.key_env, "")
    if not key:
        raise SystemExit(f"bench engine: ${args.key_env} is empty")
    langs = [v.strip() for v in args.langs.split(",") if v.strip()]
    unknown = set(langs) - set(PROGRAMS)
    if unknown:
        raise SystemExit(f"bench engine: unsupported languages {sorted(unknown)} (py, js, bash)")
    targets = parse_targets(args.url)
    deadline = trio.current_time() + args.max_time
    report: dict[str, Any] = {"cpus": os.cpu_count(), "repeat": args.repeat, "targets": {}}
    for name, url in targets:
        report["targets"][name] = {"url": url, "latency": {}, "throughput": {}}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        for name, url in targets:
            clients[name] = await stack.enter_async_context(httpx.AsyncClient(
                base_url=url, headers={"X-API-Key": key}, limits=limits, timeout=httpx.Timeout(120.0),
                trust_env=False))
        # Latency rounds: the lean client (bench/lean.py) unless told otherwise; throughput: httpx.
        timed: dict[str, Any] = dict(clients)
        if args.latency_client == "h11":
            for name, url in targets:
                lean = LeanClient(url, headers={"X-API-Key": key})
                stack.push_async_callback(lean.aclose)
                timed[name] = lean
        report["latency_client"] = args.latency_client
        if args.idle > 0:
            await trio.sleep(min(5.0, args.idle))  # let the pools settle after start-up
        pids: dict[str, int | None] = {}
        for name, url in targets:
            pid = args.server_pid if len(targets) == 1 else None
            if pid is None and httpx.URL(url).host in ("127.0.0.1", "localhost"):
                pid = pid_of_port(httpx.URL(url).port or 80)
            pids[name] = pid
            if pid is not None and args.idle > 0:
                idle = await idle_cpu(pid, args.idle)
                idle["pid"] = pid
                report["targets"][name]["idle"] = idle
                print(f"[{name}] idle:", json.dumps(idle), flush=True)
        for lang in langs:
            binary = real_binary(lang, args.python)
            for client in timed.values():
                for _ in range(3):  # warm the connection and the pools, untimed
                    await one_exec(client, lang, Tally())
            rows = await latency_interleaved(timed, lang, binary, args.rounds, deadline)
            for name, row in rows.items():
                report["targets"][name]["latency"][lang] = row
                print(f"[{name}] latency {lang}:", json.dumps(row), flush=True)
        for lang in langs:
            for conc in args.conc:
                for rep in range(args.repeat):
                    for name in _rotated(list(clients), rep):
                        if trio.current_time() + args.window > deadline:
                            break
                        await trio.sleep(args.pause)  # let the pools refill between windows
                        row = await throughput(clients[name], lang, conc, args.window, pids[name])
                        report["targets"][name]["throughput"].setdefault(lang, []).append(row)
                        print(f"[{name}] throughput {lang}:", json.dumps(row), flush=True)
    report["summary"] = summarize(report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per target: p50 ratio to the bare start, and the median exec/s (errors, busy summed) per
    language and concurrency over the repeated windows."""
    out: dict[str, Any] = {}
    for name, t in report["targets"].items():
        row: dict[str, Any] = {}
        for lang, lat in t["latency"].items():
            row[lang] = {"exec_p50_ms": lat["exec_p50_ms"], "exec_p99_ms": lat["exec_p99_ms"],
                         "p50_ratio": lat["ratio_p50"]}
        for lang, windows in t["throughput"].items():
            by_conc: dict[int, list[dict[str, Any]]] = {}
            for w in windows:
                by_conc.setdefault(w["concurrency"], []).append(w)
            for conc, ws in by_conc.items():
                cpu = [w["server_cpu_ms_per_exec"] for w in ws if "server_cpu_ms_per_exec" in w]
                row.setdefault(lang, {})[f"c{conc}"] = {
                    "exec_per_s": round(statistics.median(w["exec_per_s"] for w in ws), 2),
                    "server_cpu_ms_per_exec": round(statistics.median(cpu), 1) if cpu else None,
                    "errors": sum(w["errors"] + w["wrong"] for w in ws), "busy": sum(w["busy"] for w in ws),
                    "windows": len(ws)}
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kcr-trio bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, action="append",
                   help="[NAME=]URL of a server, e.g. base=http://127.0.0.1:8000; repeat it to compare "
                        "servers side by side (rounds and windows interleaved between them)")
    p.add_argument("--key-env", required=True, help="environment variable holding the API key")
    p.add_argument("--langs", default="py,js,bash")
    p.add_argument("--rounds", type=int, default=100, help="latency rounds per language")
    p.add_argument("--conc", default="1,4,8,16")
    p.add_argument("--window", type=float, default=20.0, help="seconds per throughput window")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between windows")
    p.add_argument("--repeat", type=int, default=1,
                   help="throughput windows per target, language and concurrency (median reported)")
    p.add_argument("--idle", type=float, default=30.0, help="idle CPU window (0: skip)")
    p.add_argument("--server-pid", type=int, default=None)
    p.add_argument("--python", default=None,
                   help="python3 to resolve for the bare start (default: python3 on the sandbox's PATH; "
                        "set it when the server runs user code with KCR_LOCAL_PYTHON)")
    p.add_argument("--max-time", type=float, default=1800.0)
    p.add_argument("--latency-client", choices=("h11", "httpx"), default="h11",
                   help="client of the c=1 latency rounds: h11 on one kept-alive connection (lean, the "
                        "default) or httpx (as the throughput windows); both are HTTP/1.1 over TCP")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    args.conc = [int(v) for v in args.conc.split(",") if v.strip()]
    if not args.conc or any(not 1 <= c <= 256 for c in args.conc) or not 1 <= args.rounds <= 10000:
        p.error("--conc: 1..256 each; --rounds: 1..10000")
    if not 1 <= args.repeat <= 100:
        p.error("--repeat: 1..100")
    report = trio.run(run, args)
    print("summary:", json.dumps(report["summary"]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
