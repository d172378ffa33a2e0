"""Pre-warm benchmark: ``python -m sidecar.bench [--rounds N]``.

Measures, in one run and interleaved (so machine noise hits all three alike), the median wall time of:

* ``prewarm on``  — ``POST /execute {"code": "print('hi')"}`` end to end against a sidecar whose
  Python interpreter is already started;
* ``prewarm off`` — the same request against a sidecar that starts ``python3 code.py`` per run;
* ``bare``        — ``python3 -c "print('hi')"`` started and waited for by this process (the
  interpreter the sidecar uses for user code).

Target: ``prewarm on`` ≤ 25 % of ``bare``. The client is the standard library's ``http.client`` on
a kept-alive connection, so client overhead is small and the same for both sidecars. Before each
timed pre-warm request the benchmark waits (untimed) until the sidecar reports ``/ready`` again,
i.e. until its next interpreter is up, as it would be for a request arriving at an idle sidecar.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .languages import Toolchain


def _start(workdir: str, prewarm: bool) -> tuple[subprocess.Popen[bytes], int]:
    argv = [sys.executable, "-m", "sidecar", "--host", "127.0.0.1", "--port", "0", "--language", "py",
            "--working-dir", workdir, "--announce", "--prewarm", "true" if prewarm else "false"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("sidecar failed to start")
    return proc, int(json.loads(line)["port"])


def _post(conn: http.client.HTTPConnection, body: bytes) -> dict[str, object]:
    conn.request("POST", "/execute", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise SystemExit(f"/execute answered {resp.status}: {data[:200]!r}")
    result: dict[str, object] = json.loads(data)
    return result


def _wait_ready(conn: http.client.HTTPConnection, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            return
        time.sleep(0.005)
    raise SystemExit("sidecar never became ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    python = Toolchain().python
    body = json.dumps({"code": "print('hi')", "timeout": 10}).encode()
    root = tempfile.mkdtemp(prefix="kcr-bench-")
    os.chmod(root, 0o755)  # the run uid must reach the working dirs (see limits.reachable_by)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        warm_proc, warm_port = _start(os.path.join(root, "warm"), True)
        procs.append(warm_proc)
        cold_proc, cold_port = _start(os.path.join(root, "cold"), False)
        procs.append(cold_proc)
        warm = http.client.HTTPConnection("127.0.0.1", warm_port, timeout=30)
        cold = http.client.HTTPConnection("127.0.0.1", cold_port, timeout=30)
        samples: dict[str, list[float]] = {"prewarm on": [], "prewarm off": [], "bare python3 -c": []}
        for i in range(args.warmup + args.rounds):
            _wait_ready(warm)
            t0 = time.perf_counter()
            res = _post(warm, body)
            t1 = time.perf_counter()
            assert res["stdout"] == "hi\n", res
            t2 = time.perf_counter()
            res = _post(cold, body)
            t3 = time.perf_counter()
            assert res["stdout"] == "hi\n", res
            t4 = time.perf_counter()
            out = subprocess.run([python, "-c", "print('hi')"], capture_output=True, check=True).stdout
            t5 = time.perf_counter()
            assert out == b"hi\n"
            if i >= args.warmup:
                samples["prewarm on"].append((t1 - t0) * 1000)
                samples["prewarm off"].append((t3 - t2) * 1000)
                samples["bare python3 -c"].append((t5 - t4) * 1000)
        bare = statistics.median(samples["bare python3 -c"])
        print(f"python: {python}   rounds: {args.rounds} (interleaved)")
        print(f"{'mode':<18}{'median ms':>10}{'p90 ms':>9}{'vs bare':>9}")
        for name, values in samples.items():
            med = statistics.median(values)
            p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else med
            print(f"{name:<18}{med:>10.2f}{p90:>9.2f}{med / bare:>8.0%} ")
        ratio = statistics.median(samples["prewarm on"]) / bare
        print(f"target prewarm on <= 25% of bare: {'met' if ratio <= 0.25 else 'NOT met'} ({ratio:.0%})")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
