"""Write the report directory and print the terminal summary.

``report.json`` holds everything: options, targets (never keys), every run's raw samples, figures,
errors and details, and the summaries. ``summary.md`` is the readable digest with the plots linked;
the terminal table shows the same figures.

Reading a figure cell: ``median [min–max]`` over runs, where each run's value is e.g. that run's p50.
``B/A`` is the ratio of medians: below 1 is better for "lower is better" figures (latency, waste,
hang-ups), above 1 for "higher" ones (req/s, ok, passed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

ARROWS = {"higher": "↑", "lower": "↓", "neutral": "·"}


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"


def cell(s: dict[str, Any]) -> str:
    if not s or s.get("median") is None:
        return "–"
    if s.get("runs", 0) > 1 and s.get("min") != s.get("max"):
        return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"
    return fmt(s["median"])


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def targets_of(report: dict[str, Any]) -> list[str]:
    return [t["name"] for t in report["targets"]]


def markdown(report: dict[str, Any], plots: dict[str, list[str]]) -> str:
    names = targets_of(report)
    base, others = names[0], names[1:]
    out = ["# kcr-trio bench report", ""]
    out.append(f"Started {report['started']}, finished {report['finished']} on {report['host']['hostname']} "
               f"({report['host']['cpus']} CPUs, Python {report['host']['python']}).")
    if report.get("truncated"):
        out.append(f"\n**Truncated:** {report['truncated_reason']} — later scenarios or runs are missing.")
    out += ["", "| target | URL | key | on this machine |", "|---|---|---|---|"]
    out += [f"| {t['name']} | {t['url']} | {t['key']} | {'yes' if t['loopback'] else 'no'} |" for t in report["targets"]]
    o = report["options"]
    out += ["", f"Runs per step: {o['runs']} (interleaved: {report['order']}). "
            f"Each cell is the **median over runs [min–max]** of that run's value; "
            + (f"**{'/'.join(others)} ÷ {base}** is the ratio of medians. " if others else "")
            + "Raw samples are in `report.json`.", ""]
    for name, section in report["scenarios"].items():
        out += [f"## {name}", "", f"{section['title']}.", ""]
        if not section["runs"]:
            out += ["_not run_", ""]
            continue
        if name == "conformance":
            out += conformance_md(section, names)
        head = ["step", "figure", *names, *[f"{t}/{base}" for t in others]]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for f in section["summary"].get("figures", []):
            arrow = ARROWS[f["better"]]
            row = [f["step"], f"{f['figure']} {arrow}", *[cell(f["targets"][t]) for t in names],
                   *[fmt_ratio(f["ratio"].get(t)) for t in others]]
            out.append("| " + " | ".join(row) + " |")
        series = [s for s in section["summary"].get("series", []) if any(s["targets"][t]["n"] for t in names)]
        if series:
            out += ["", "Pooled samples (all runs together):", "",
                    "| step | series | target | n | p50 | p95 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
            for s in series:
                for t in names:
                    d = s["targets"][t]
                    out.append(f"| {s['step']} | {s['series']} | {t} | {d['n']} | {fmt(d['p50'])} | {fmt(d['p95'])} "
                               f"| {fmt(d['p99'])} | {fmt(d['max'])} |")
        errs = [(r["target"], r["step"], e) for r in section["runs"] for e in r["errors"]]
        if errs and name != "conformance":
            out += ["", f"Errors ({len(errs)} recorded; first 8):", ""]
            out += [f"- {t} / {st}: `{e[:200]}`" for t, st, e in errs[:8]]
        for png in plots.get(name, []):
            out += ["", f"![{png}]({png})"]
        out.append("")
    out += ["## How to read this", "",
            "- ↓ lower is better (latency, waste, hang-ups, errors); ↑ higher is better (req/s, ok, passed); "
            "· descriptive (what happened, to read the other figures by).",
            "- Percentile figures are per run, then the median over runs; spread is the min–max over runs.",
            "  The pooled table puts all samples of all runs together (mind `n` before trusting a p99).",
            "- keepalive: any `hang-ups` means LibreChat users would see \"socket hang up\" on slow runs.",
            "- disconnect-storm: `wasted s` is execution that ran after its client left; `recovery s` is how "
            "long until a new request is served; `kill ms` (local targets) is disconnect → process exit.", ""]
    return "\n".join(out)


def conformance_md(section: dict[str, Any], names: list[str]) -> list[str]:
    rows: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}
    for r in section["runs"]:
        for c in r["info"].get("cases", []):
            rows.setdefault(c["case"], {})[r["target"]] = c
            titles[c["case"]] = c["title"]
    out = ["| case | check | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    mark = {"pass": "✅ pass", "fail": "❌ fail", "skip": "⏭ skip"}
    for case in sorted(rows):
        out.append(f"| {case} | {titles[case]} | " + " | ".join(mark.get(rows[case].get(t, {}).get("status"), "–")
                                                                 for t in names) + " |")
    fails = [(case, t, rows[case][t]["detail"]) for case in sorted(rows) for t in names
             if rows[case].get(t, {}).get("status") in ("fail", "skip") and rows[case][t]["detail"]]
    if fails:
        out += ["", "Details:", ""] + [f"- {case} {t}: `{d[:240]}`" for case, t, d in fails]
    return out + [""]


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    from kcr_trio.bench.plots import make_plots

    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report, out)
    report["plots"] = plots
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path = out / "summary.md"
    md_path.write_text(markdown(report, plots))
    return {"json": json_path, "markdown": md_path, **{p: out / p for ps in plots.values() for p in ps}}


def print_summary(report: dict[str, Any], console: Console) -> None:
    names = targets_of(report)
    base, others = names[0], names[1:]
    for name, section in report["scenarios"].items():
        if not section["runs"]:
            continue
        table = Table(title=f"{name} — {section['title']}", title_justify="left", show_lines=False)
        table.add_column("step")
        table.add_column("figure")
        for t in names:
            table.add_column(t, justify="right")
        for t in others:
            table.add_column(f"{t}/{base}", justify="right")
        for f in section["summary"].get("figures", []):
            arrow = ARROWS[f["better"]]
            table.add_row(escape(f["step"]), escape(f"{f['figure']} {arrow}"), *[cell(f["targets"][t]) for t in names],
                          *[fmt_ratio(f["ratio"].get(t)) for t in others])
        console.print(table)
        if name == "conformance":
            fails = [(r["target"], c) for r in section["runs"] for c in r["info"].get("cases", []) if c["status"] == "fail"]
            for t, c in fails:
                console.print(f"  [red]✗[/red] {t} case {c['case']} ({c['title']}): {escape(c['detail'][:160])}",
                              highlight=False)
    if report.get("truncated"):
        console.print(f"[yellow]truncated: {report['truncated_reason']}[/yellow]")
