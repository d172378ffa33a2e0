"""Drive ``wrk`` (a C load generator) and read a server's CPU and memory from ``/proc``.

Why wrk: on a two-core machine a Python load generator spends as much CPU as the server it measures
and the two fight for the cores, so the figures say more about the client than the server. wrk
costs a few percent of a core at these rates; its own CPU is still measured (``RUSAGE_CHILDREN``
around the run) and reported, so the reader can check that it stayed small.

Server-side figures come from the process that owns the target's listening socket (found through
``/proc/net/tcp*`` → socket inode → ``/proc/<pid>/fd``), so only targets on this machine get them:
CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads; a thread pool's work counts) before
and after the run, RSS is ``VmRSS`` sampled while it runs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Prints one JSON line at the end of a run; wrk's Lua API gives the totals and the latency histogram.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nKCR_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(method: str = "GET", headers: dict[str, str] | None = None, body_file: Path | None = None) -> str:
    lines = [f'wrk.method = "{method}"']
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    if body_file is not None:
        lines.append(f'local f = assert(io.open({json.dumps(str(body_file))}, "rb"))')
        lines.append("wrk.body = f:read(\"*a\")\nf:close()")
    return "\n".join(lines) + "\n" + _DONE


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    bytes: int = 0
    socket_errors: int = 0  # connect + read + write + timeout
    bad_status: int = 0  # non-2xx/3xx answers
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_cpu_s: float = 0.0
    raw: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # "KCR_ID <text>" lines a script printed


async def run_wrk(url: str, *, connections: int, seconds: float, script: str, timeout_s: float = 30.0) -> WrkResult:
    """One ``wrk -t1`` run (one client thread: wrk stays on one core, the server gets the other)."""
    with tempfile.TemporaryDirectory(prefix="kcr-wrk-") as tmp:
        path = Path(tmp) / "script.lua"
        path.write_text(script)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s",
                "-s", str(path), url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with trio.fail_after(seconds + timeout_s + 30):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout.decode("utf-8", "replace")
    line = next((x for x in out.splitlines() if x.startswith("KCR_WRK ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(out + done.stderr.decode('utf-8', 'replace'))[-400:]}")
    raw = json.loads(line[len("KCR_WRK "):])
    return WrkResult(
        requests=raw["requests"], seconds=raw["duration_us"] / 1e6, bytes=raw["bytes"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"], bad_status=raw["status"],
        p50_ms=raw["p50_us"] / 1000 if raw["requests"] else None,
        p99_ms=raw["p99_us"] / 1000 if raw["requests"] else None,
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), raw=raw,
        ids=[x[len("KCR_ID "):].strip() for x in out.splitlines() if x.startswith("KCR_ID ")],
    )


# -- the server process behind a port -------------------------------------------------------------

def listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The process holding the listening socket of ``port`` on this machine (None: not found/visible)."""
    wanted = {f"socket:[{i}]" for i in listening_inodes(port)}
    if not wanted:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    if os.readlink(fd.path) in wanted:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(pid: int, out: list[float], interval: float = 0.1) -> None:
    """Append the server's RSS every ``interval`` s until cancelled."""
    while True:
        try:
            out.append(rss_mib(pid))
        except OSError:
            return
        await trio.sleep(interval)
