"""Kubernetes reclaim benchmark: how fast a client disconnect gives the pod back.

Run it from a source checkout: ``python3 -m tests.support.kube_reclaim [--runs N] [--json]``. It lives
in the test tree, not in the shipped ``kcr_trio.bench``, because it drives the executor object
directly and, by default, the Kubernetes API emulator from ``tests/support``; the shipped bench
talks to servers over public HTTP only.

Each round takes a warm pod from the pool, starts a program that would run for minutes, and then
cancels the request scope — exactly what a client disconnect does to ``/exec``. It measures, from
that moment:

* **program killed** — the user's process is gone (emulator only: it can see the processes);
* **delete sent** — the executor's DELETE request for the pod has been answered;
* **pod deleted** — the watch reported the pod ``DELETED`` (its processes are gone);
* **pool refilled** — the pool is back at its target of ready pods. Replacement starts when a pod
  is *taken*, not when it is returned, so this is often 0: the pool was refilled while the program
  ran. ``replacement ready`` (from acquisition) is reported alongside.

By default it runs against the Kubernetes API emulator from the test suite: real HTTP, the official
client, real sidecar processes. ``--kubeconfig`` points it at a real cluster instead (the execution
images must exist there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

LONG_PROGRAM = "import time\nopen('started.txt', 'w').close()\ntime.sleep(300)\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m tests.support.kube_reclaim", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="rounds to measure (default 10)")
    p.add_argument("--pool", type=int, default=2, help="warm pool size for py (default 2)")
    p.add_argument("--kubeconfig", help="use this cluster instead of the emulator")
    p.add_argument("--namespace", default="kcr-bench", help="execution namespace")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    return p


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
        "n": len(ms),
    }


async def _measure(args: argparse.Namespace, kubeconfig: str, emulator: Any) -> dict[str, list[float]]:
    from kcr_trio.backends.kubernetes_executor import KubernetesSettings, open_kubernetes_executor
    from kcr_trio.config import Settings
    from kcr_trio.core.languages import LANGUAGES

    pools: dict[str, Any] = {f"pod_pool_{lang}": 0 for lang in LANGUAGES}
    pools["pod_pool_py"] = args.pool
    settings = Settings(_env_file=None, **pools)
    ks = KubernetesSettings(_env_file=None, kubeconfig=kubeconfig, k8s_namespace=args.namespace)
    figures: dict[str, list[float]] = {k: [] for k in (
        "program_killed", "delete_sent", "pod_deleted", "pool_refilled", "replacement_ready")}
    async with open_kubernetes_executor(settings, ks) as ex:
        if not await ex.wait_warm(120):
            raise SystemExit(f"pool did not warm up: {ex.snapshot()['pools']}")
        for _ in range(args.runs):
            await _one_round(ex, args, emulator, figures)
    return figures


async def _one_round(ex: Any, args: argparse.Namespace, emulator: Any, figures: dict[str, list[float]]) -> None:
    """One disconnect, measured. Its own function so the closures below bind this round's values."""
    pool = ex.pools["py"]
    while len(pool.ready) < pool.target:  # start each round from a full pool
        await pool.refilled.wait()
    refilled: list[float] = []
    killed: list[float] = []
    cancelled: list[float] = []

    async def note_refill() -> None:
        with trio.move_on_after(60):
            while len(pool.ready) < pool.target:
                await pool.refilled.wait()
            refilled.append(time.monotonic())

    async with trio.open_nursery() as outer:
        with trio.CancelScope() as request:  # what a client disconnect cancels
            async with ex.sandbox("py", wait=30) as sb:
                acquired = time.monotonic()
                outer.start_soon(note_refill)  # the replacement starts now
                pod = sb.pod
                main_pid = emulator.main_pid(args.namespace, pod.name) if emulator else None

                async def disconnect() -> None:
                    await _program_started(emulator, args, pod.name)
                    user = _descendants(main_pid) if main_pid else set()
                    outer.start_soon(_killed_at, user, killed)
                    cancelled.append(time.monotonic())
                    request.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(disconnect)
                    await sb.run(LONG_PROGRAM, timeout=300, request_id="bench")
        t0 = cancelled[0]
        with trio.move_on_after(30):
            await pod.wait_for(lambda p: p.gone)
    if pod.deleted_at:
        figures["pod_deleted"].append(pod.deleted_at - t0)
    if ex.reclaims:
        figures["delete_sent"].append(ex.reclaims[-1]["delete_sent"] - t0)
    if refilled:
        figures["pool_refilled"].append(max(0.0, refilled[0] - t0))
        figures["replacement_ready"].append(refilled[0] - acquired)
    if killed:
        figures["program_killed"].append(killed[0] - t0)


async def _program_started(emulator: Any, args: argparse.Namespace, name: str) -> None:
    """Wait until the program runs (emulator: its marker file; a real cluster: a short pause)."""
    if emulator is None:
        await trio.sleep(1.0)
        return
    with trio.move_on_after(30):
        while True:
            wd = emulator.workdir(args.namespace, name)
            if wd and (wd / "started.txt").exists():
                return
            await trio.sleep(0.005)


async def _killed_at(pids: set[int], out: list[float]) -> None:
    with trio.move_on_after(30):
        while any(_alive(p) for p in pids):
            await trio.sleep(0.002)
        out.append(time.monotonic())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rfind(b")") + 2:].split()[1]), []).append(int(entry.name))
    out, stack = set(), [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with ExitStack() as stack:
        emulator = None
        kubeconfig = args.kubeconfig
        if not kubeconfig:
            from tests.support.kube_emulator import KubeEmulator

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kcr-bench-")))
            emulator = stack.enter_context(KubeEmulator(tmp / "cluster", namespaces=(args.namespace,)))
            kubeconfig = str(emulator.write_kubeconfig(tmp / "kubeconfig", namespace=args.namespace))
        figures = trio.run(_measure, args, kubeconfig, emulator)
    result = {k: _summary(v) for k, v in figures.items() if v}
    if args.json:
        print(json.dumps({"summary": result, "raw_ms": {k: [round(x * 1000, 2) for x in v] for k, v in figures.items()}}))
        return 0
    where = "real cluster" if args.kubeconfig else "emulator (real HTTP + kubernetes client + sidecar processes)"
    print(f"k8s-reclaim: {args.runs} disconnects, py pool of {args.pool}, {where}")
    labels = {
        "program_killed": "disconnect -> program killed",
        "delete_sent": "disconnect -> pod DELETE answered",
        "pod_deleted": "disconnect -> pod deleted (watch)",
        "pool_refilled": "disconnect -> pool refilled",
        "replacement_ready": "acquisition -> replacement ready",
    }
    for key, label in labels.items():
        if key in result:
            s = result[key]
            print(f"  {label:36s} median {s['median_ms']:8.1f} ms  (min {s['min_ms']:.1f}, max {s['max_ms']:.1f}, n={s['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
