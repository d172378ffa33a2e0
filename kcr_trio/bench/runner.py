"""Walk the scenarios: ``for scenario: for rep: for step: for target`` — A and B interleaved.

Everything is bounded: every scenario loop has a count and a deadline of its own, and the whole run
sits under ``max_time`` (``--max-time``); when that expires, the run stops where it is and the report
is written with ``truncated: true``. A scenario that raises is recorded as a failed run (with the
error) and the bench moves on: one broken target must not hide the other's numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from kcr_trio.bench.model import Context, Options, RunRecord, Scenario, StepResult
from kcr_trio.bench.stats import describe, ratio, spread
from kcr_trio.bench.targets import Target

HIGHER_IS_BETTER = ("req/s", "MB/s", "ok", "passed")
# Descriptive counts: neither direction is "better" (what happened, for reading the other figures).
NEUTRAL = ("left mid-run", "completed early", "never started", "outputs stored", "idle opened",
           "idle closed by server", "slow answered", "rejected", "skipped", "metrics:")


def direction(name: str) -> str:
    if any(name.startswith(n) for n in NEUTRAL):
        return "neutral"
    return "higher" if any(h in name for h in HIGHER_IS_BETTER) else "lower"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def options_json(opts: Options) -> dict[str, Any]:
    out = dataclasses.asdict(opts)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """The command line without keys: ``--target A=URL,KEY`` becomes ``A=URL,<key>``."""
    out: list[str] = []
    after_target = False
    for arg in argv:
        if after_target or arg.startswith("--target="):
            prefix = "--target=" if arg.startswith("--target=") else ""
            spec = arg[len(prefix):]
            url, sep, _ = spec.partition(",")
            arg = prefix + url + (",<key>" if sep else "")
        after_target = arg == "--target"
        out.append(arg)
    return out


def new_report(targets: list[Target], scenarios: list[Scenario], opts: Options, argv: list[str]) -> dict[str, Any]:
    return {
        "tool": "kcr-trio bench",
        "format": 1,
        "started": now_iso(),
        "finished": None,
        "argv": redact_argv(argv),
        "options": options_json(opts),
        "host": {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "targets": [t.public() for t in targets],
        "order": "for each scenario: for rep: for step: for target in the order given (A, B, A, B, ...)",
        "truncated": False,
        "truncated_reason": None,
        "scenarios": {s.name: {"title": s.title, "steps": s.steps(opts), "runs": [], "summary": {}} for s in scenarios},
    }


def record_json(r: RunRecord) -> dict[str, Any]:
    return {"step": r.step, "target": r.target, "rep": r.rep, "started": r.started, "seconds": round(r.seconds, 3),
            "figures": r.result.figures, "samples": r.result.samples, "info": r.result.info, "errors": r.result.errors}


def summarize(section: dict[str, Any], target_names: list[str]) -> dict[str, Any]:
    """Median of each per-run figure with spread; pooled percentiles of each series; ratios to the first target."""
    runs = section["runs"]
    figures: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    for step in section["steps"]:
        step_runs = [r for r in runs if r["step"] == step]
        fig_names: list[str] = []
        ser_names: list[str] = []
        for r in step_runs:
            fig_names += [f for f in r["figures"] if f not in fig_names]
            ser_names += [s for s in r["samples"] if s not in ser_names]
        for name in fig_names:
            per_target = {t: spread([r["figures"].get(name) for r in step_runs if r["target"] == t])
                          for t in target_names}
            base = per_target[target_names[0]]["median"]
            figures.append({
                "step": step, "figure": name,
                "better": direction(name),
                "targets": per_target,
                "ratio": {t: ratio(per_target[t]["median"], base) for t in target_names[1:]},
            })
        for name in ser_names:
            pooled = {t: describe([v for r in step_runs if r["target"] == t for v in r["samples"].get(name, [])])
                      for t in target_names}
            base_pool = pooled[target_names[0]]
            series.append({
                "step": step, "series": name, "targets": pooled,
                "ratio_p50": {t: ratio(pooled[t]["p50"], base_pool["p50"]) for t in target_names[1:]},
                "ratio_p99": {t: ratio(pooled[t]["p99"], base_pool["p99"]) for t in target_names[1:]},
            })
    return {"figures": figures, "series": series}


async def run_bench(
    report: dict[str, Any],
    targets: list[Target],
    scenarios: list[Scenario],
    opts: Options,
    *,
    max_time: float,
    on_unit: Callable[[str, str, bool], None] | None = None,
) -> dict[str, Any]:
    """Fill ``report`` in place (so a caller can still write it after an interrupt) and return it."""
    advance = on_unit or (lambda _scenario, _desc, _done: None)
    names = [t.name for t in targets]
    with trio.move_on_after(max_time) as scope:
        for scenario in scenarios:
            section = report["scenarios"][scenario.name]
            ctx = Context(opts)
            reps = 1 if scenario.once else opts.runs
            for rep in range(reps):
                for step in section["steps"]:
                    for target in targets:
                        desc = f"{scenario.name}: {step} @ {target.name}, run {rep + 1}/{reps}"
                        advance(scenario.name, desc, False)
                        started, t0 = time.time(), time.perf_counter()
                        try:
                            result = await scenario.run(ctx, target, step, rep)
                        except Exception as exc:
                            result = StepResult(figures={"failed": 1})
                            result.error(f"{type(exc).__name__}: {exc}")
                            result.info["traceback"] = traceback.format_exc(limit=6)[-2000:]
                        record = RunRecord(scenario.name, step, target.name, rep, started,
                                           time.perf_counter() - t0, result)
                        section["runs"].append(record_json(record))
                        advance(scenario.name, desc, True)
            section["summary"] = summarize(section, names)
    if scope.cancelled_caught:
        report["truncated"] = True
        report["truncated_reason"] = f"--max-time {max_time:g} s reached"
        for section in report["scenarios"].values():
            section["summary"] = summarize(section, names)
    report["finished"] = now_iso()
    return report
