"""Report plots (matplotlib, Agg backend: no display needed). One PNG per view, named after it.

* ``<scenario>-cdf.png``: latency CDFs, one line per target and step (exec-latency, concurrency,
  slow-clients, files-rps, upload-exec total, disconnect-storm kill latency); log x when wide;
* ``concurrency-throughput.png``: req/s and p50/p99 vs concurrency, per target;
* ``keepalive-hangups.png``: ok / hang-up / error counts per target;
* ``disconnect-storm-waste.png``: wasted execution seconds and capacity recovery per target.

Bars show the median over runs with min–max whiskers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
CDF_SERIES = {
    "exec-latency": "latency ms",
    "concurrency": "latency ms",
    "slow-clients": "latency ms",
    "files-rps": "latency ms",
    "upload-exec": "total ms",
    "disconnect-storm": "kill ms",
}


def _pooled(section: dict[str, Any], step: str, target: str, series: str) -> list[float]:
    return sorted(v for r in section["runs"] if r["step"] == step and r["target"] == target
                  for v in r["samples"].get(series, []))


def _figure(section: dict[str, Any], step: str, name: str) -> dict[str, Any] | None:
    return next((f for f in section["summary"].get("figures", []) if f["step"] == step and f["figure"] == name), None)


def cdf(name: str, section: dict[str, Any], targets: list[str], out: Path) -> Path | None:
    series = CDF_SERIES[name]
    steps = section["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    drawn = False
    styles = ["-", "--", ":", "-."]
    for ti, t in enumerate(targets):
        for si, step in enumerate(steps):
            data = _pooled(section, step, t, series)
            if not data:
                continue
            ys = [(i + 1) / len(data) for i in range(len(data))]
            ax.step(data, ys, where="post", color=COLORS[ti % 4], linestyle=styles[si % 4],
                    label=f"{t} {step} (n={len(data)})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.get_lines()]
    lo = min((x.min() for x in xs if len(x)), default=0)
    hi = max((x.max() for x in xs if len(x)), default=0)
    if lo > 0 and hi / lo > 30:
        ax.set_xscale("log")  # wide ranges (1 KB vs 100 MB, c=1 vs c=64) stay readable
    ax.set_xlabel(series)
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(f"{name}: {series} CDF")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = out / f"{name}-cdf.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def throughput(section: dict[str, Any], targets: list[str], out: Path) -> Path | None:
    steps = section["steps"]
    levels = [int(s.split("=")[1]) for s in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for ti, t in enumerate(targets):
        rps = [(_figure(section, s, "req/s") or {}).get("targets", {}).get(t, {}).get("median") for s in steps]
        p50 = [(_figure(section, s, "p50 ms") or {}).get("targets", {}).get(t, {}).get("median") for s in steps]
        p99 = [(_figure(section, s, "p99 ms") or {}).get("targets", {}).get(t, {}).get("median") for s in steps]
        c = COLORS[ti % 4]
        ax1.plot(levels, [v if v is not None else float("nan") for v in rps], "o-", color=c, label=t)
        ax2.plot(levels, [v if v is not None else float("nan") for v in p50], "o-", color=c, label=f"{t} p50")
        ax2.plot(levels, [v if v is not None else float("nan") for v in p99], "s--", color=c, label=f"{t} p99")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("successful req/s (median of runs)")
    ax1.set_title("throughput vs concurrency")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency ms (median of runs)")
    ax2.set_title("latency vs concurrency")
    for ax in (ax1, ax2):
        ax.set_xticks(levels)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path = out / "concurrency-throughput.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bars(section: dict[str, Any], targets: list[str], figures: list[str], title: str, ylabel: str,
         path: Path, second: tuple[str, str] | None = None) -> Path | None:
    step = section["steps"][0]
    n_axes = 2 if second else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(5.5 * n_axes, 4.5), dpi=110, squeeze=False)
    groups = [(axes[0][0], figures, ylabel, title)]
    if second:
        groups.append((axes[0][1], [second[0]], second[1], second[0]))
    width = 0.8 / max(1, len(targets))
    any_data = False
    for ax, names, label, ttl in groups:
        for ti, t in enumerate(targets):
            meds, lo, hi = [], [], []
            for name in names:
                s = ((_figure(section, step, name) or {}).get("targets") or {}).get(t) or {}
                m = s.get("median")
                meds.append(m if m is not None else 0.0)
                lo.append((m - s["min"]) if m is not None and s.get("min") is not None else 0.0)
                hi.append((s["max"] - m) if m is not None and s.get("max") is not None else 0.0)
                any_data = any_data or m is not None
            xs = [i + ti * width for i in range(len(names))]
            drawn = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, color=COLORS[ti % 4], label=t)
            ax.bar_label(drawn, labels=[f"{m:.3g}" for m in meds], fontsize=8, padding=2)
        ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(ttl)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if not any_data:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(report: dict[str, Any], out: Path) -> dict[str, list[str]]:
    """Write every applicable plot; returns scenario -> PNG file names (relative to ``out``)."""
    targets = [t["name"] for t in report["targets"]]
    made: dict[str, list[str]] = {}
    for name, section in report["scenarios"].items():
        if not section["runs"] or not section["summary"]:
            continue
        paths: list[Path | None] = []
        if name in CDF_SERIES:
            paths.append(cdf(name, section, targets, out))
        if name == "concurrency":
            paths.append(throughput(section, targets, out))
        if name == "keepalive":
            paths.append(bars(section, targets, ["ok", "hang-ups", "errors"], "LibreChat sequence outcomes",
                              "requests per run (median)", out / "keepalive-hangups.png"))
        if name == "disconnect-storm":
            waste = ["wasted s (files)"] + (["wasted s (proc)"] if _figure(section, section["steps"][0], "wasted s (proc)") else [])
            paths.append(bars(section, targets, waste, "wasted execution seconds per storm", "seconds (median of runs)",
                              out / "disconnect-storm-waste.png", second=("recovery s", "seconds")))
        made[name] = [p.name for p in paths if p is not None]
    return made
