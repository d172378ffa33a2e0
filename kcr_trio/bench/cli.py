"""``kcr-trio bench``: A/B benchmarks and conformance checks against servers the operator names.

    kcr-trio bench --target A=http://127.0.0.1:8001,env:KEY_A --target B=http://127.0.0.1:8002,env:KEY_B \\
        --scenario exec-latency --scenario concurrency --runs 5 --report ./bench-report

    kcr-trio bench list                # the scenarios
    kcr-trio bench prewarm ...         # sidecar pre-warm latency (sidecar.bench)
    kcr-trio bench engine ...          # /exec latency, exec/s, idle CPU (kcr_trio.bench.engine)

There is no default target: without ``--target`` the bench refuses to run. Every loop is bounded by
a count and a deadline, and the whole run by ``--max-time``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kcr_trio.bench.model import Options
from kcr_trio.bench.targets import TargetError, parse_targets

DELEGATES = {
    "prewarm": ("sidecar.bench", "sidecar pre-warm latency benchmark"),
    "engine": ("kcr_trio.bench.engine", "execution engine: /exec latency vs bare start, exec/s, idle CPU"),
}
MAX_SIZE = 100 * 1024 * 1024
HTTP_ROUTES = ("health", "files", "upload-1k", "upload-10m", "download-10m")


def _int_list(text: str, lo: int, hi: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated integers expected, got {text!r}") from None
    if not values or len(values) > 12 or any(not lo <= v <= hi for v in values):
        raise argparse.ArgumentTypeError(f"{what}: 1–12 values, each in {lo}..{hi}")
    return values


def _bounded(kind: Callable[[str], Any], lo: float, hi: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo:g}..{hi:g}")
        return v

    return parse


def _sizes(text: str) -> list[int]:
    from kcr_trio.bench.scenarios.upload_exec import parse_size

    try:
        sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"sizes like 1KB,1MB,10MB expected, got {text!r}") from None
    if not sizes or len(sizes) > 10 or any(not 1 <= s <= MAX_SIZE for s in sizes):
        raise argparse.ArgumentTypeError("1–10 sizes, each between 1B and 100MB")
    return sizes


def _leave(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"MIN-MAX seconds expected, got {text!r}") from None
    if not 0.05 <= lo <= hi <= 120:
        raise argparse.ArgumentTypeError("need 0.05 <= MIN <= MAX <= 120")
    return lo, hi


def build_parser(scenario_names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kcr-trio bench",
        description="A/B benchmarks and conformance checks against servers speaking the Code Interpreter API. "
                    "Also: `kcr-trio bench list | prewarm ... | engine ...`.",
    )
    p.add_argument("--target", action="append", default=[], metavar="NAME=URL[,KEY]",
                   help="a server to measure (repeat; 2 for A/B). KEY may be literal, env:VAR or @FILE")
    p.add_argument("--scenario", action="append", default=[], metavar="S",
                   help=f"repeatable; 'all' or one of: {', '.join(scenario_names)}")
    p.add_argument("--runs", type=_bounded(int, 1, 50), default=3, help="repetitions per step (default 3)")
    p.add_argument("--duration", type=_bounded(float, 0.2, 600), default=5.0, help="seconds per timed window")
    p.add_argument("--requests", type=_bounded(int, 1, 10000), default=20, help="timed requests per run (exec-latency)")
    p.add_argument("--warmup", type=_bounded(int, 0, 50), default=2)
    p.add_argument("--timeout", type=_bounded(float, 1, 600), default=60.0, help="per HTTP request")
    p.add_argument("--max-requests-per-window", type=_bounded(int, 1, 1_000_000), default=5000)
    p.add_argument("--languages", default="py", help="exec-latency languages, comma-separated (default py)")
    p.add_argument("--concurrency", default="1,2,4,8", help="concurrency levels (default 1,2,4,8; max 256)")
    p.add_argument("--sizes", type=_sizes, default=[1024, 1024 * 1024, 10 * 1024 * 1024],
                   help="upload-exec sizes (default 1KB,1MB,10MB; max 100MB)")
    p.add_argument("--uploads-per-run", type=_bounded(int, 1, 100), default=3)
    p.add_argument("--keepalive-seconds", type=_bounded(float, 5.5, 60), default=8.0,
                   help="how long the keep-alive /exec runs (> 5 s)")
    p.add_argument("--keepalive-clients", type=_bounded(int, 1, 20), default=3)
    p.add_argument("--storm-clients", type=_bounded(int, 1, 64), default=8)
    p.add_argument("--storm-run-seconds", type=_bounded(float, 1, 120), default=10.0)
    p.add_argument("--storm-leave", type=_leave, default=(0.5, 3.0), metavar="MIN-MAX",
                   help="clients leave at a random time in this range (s)")
    p.add_argument("--proc-watch", choices=["auto", "on", "off"], default="auto",
                   help="time process deaths via /proc (auto: loopback targets)")
    p.add_argument("--idle-connections", type=_bounded(int, 0, 1000), default=50)
    p.add_argument("--slow-senders", type=_bounded(int, 0, 200), default=10)
    p.add_argument("--slow-interval", type=_bounded(float, 0.05, 10), default=0.5)
    p.add_argument("--files-concurrency", default="4", help="files-rps concurrency levels (default 4)")
    p.add_argument("--http-routes", default=",".join(HTTP_ROUTES),
                   help=f"http-cost routes, comma-separated (default all: {','.join(HTTP_ROUTES)})")
    p.add_argument("--http-concurrency", default="1,16", help="http-cost concurrency levels (default 1,16)")
    p.add_argument("--max-file-mb", type=_bounded(int, 0, 100), default=10,
                   help="conformance: the targets' MAX_FILE_SIZE_MB for the 413 check (0 skips it)")
    p.add_argument("--skip-case", action="append", default=[], metavar="NN", help="conformance case to skip (repeat)")
    p.add_argument("--check-timeout", type=_bounded(float, 5, 600), default=75.0, help="per conformance case")
    p.add_argument("--node-dir", type=Path, help="directory with librechat_sequence.js and node_modules")
    p.add_argument("--seed", type=int, default=1, help="random seed (disconnect times)")
    p.add_argument("--report", type=Path, help="report directory (default ./bench-report-<UTC time>)")
    p.add_argument("--max-time", type=_bounded(float, 1, 86400), default=3600.0, help="bound on the whole run (s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    from kcr_trio.bench.client import HELLO

    langs = [v.strip().lower() for v in args.languages.split(",") if v.strip()]
    unknown = [v for v in langs if v not in HELLO]
    if not langs or unknown:
        parser.error(f"--languages: unknown {unknown}; choose from {', '.join(HELLO)}")
    try:
        conc = _int_list(args.concurrency, 1, 256, "--concurrency")
        files_conc = _int_list(args.files_concurrency, 1, 256, "--files-concurrency")
        http_conc = _int_list(args.http_concurrency, 1, 256, "--http-concurrency")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    http_routes = [r.strip() for r in args.http_routes.split(",") if r.strip()]
    if not http_routes or any(r not in HTTP_ROUTES for r in http_routes):
        parser.error(f"--http-routes: choose from {', '.join(HTTP_ROUTES)}")
    return Options(
        runs=args.runs, duration=args.duration, requests=args.requests, warmup=args.warmup, timeout=args.timeout,
        languages=langs, concurrency=conc, max_requests_per_window=args.max_requests_per_window, sizes=args.sizes,
        uploads_per_run=args.uploads_per_run, keepalive_seconds=args.keepalive_seconds,
        keepalive_clients=args.keepalive_clients, storm_clients=args.storm_clients,
        storm_run_seconds=args.storm_run_seconds, storm_leave=args.storm_leave, proc_watch=args.proc_watch,
        idle_connections=args.idle_connections, slow_senders=args.slow_senders, slow_interval=args.slow_interval,
        files_concurrency=files_conc, conformance_max_file_mb=args.max_file_mb or None,
        conformance_skip=[c.zfill(2) for c in args.skip_case], check_timeout=args.check_timeout,
        node_dir=args.node_dir, seed=args.seed, http_routes=http_routes, http_concurrency=http_conc,
    )


def delegate(name: str, argv: list[str]) -> int:
    module_name, what = DELEGATES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"kcr-trio bench {name}: the {what} ({module_name}) is not part of this installation", file=sys.stderr)
            return 2
        raise
    main = getattr(module, "main", None)
    if main is None:
        print(f"kcr-trio bench {name}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    return int(main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:
        return delegate(argv[0], argv[1:])
    from kcr_trio.bench.scenarios import registry

    scenarios = registry()
    if argv and argv[0] == "list":
        for s in scenarios.values():
            print(f"{s.name:18} {s.title}")
        for name, (_module, what) in DELEGATES.items():
            print(f"{name:18} {what} (subcommand: kcr-trio bench {name} --help)")
        return 0
    parser = build_parser(list(scenarios))
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.target)
    except TargetError as exc:
        parser.error(str(exc))
    chosen = list(scenarios) if "all" in args.scenario else args.scenario
    if not chosen:
        parser.error("choose at least one --scenario (or --scenario all)")
    unknown = [s for s in chosen if s not in scenarios]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(scenarios)}")
    opts = options_from(args, parser)
    out = args.report or Path(f"bench-report-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}")
    picked = [scenarios[s] for s in dict.fromkeys(chosen)]
    return execute(targets, picked, opts, out, argv=argv, max_time=args.max_time, progress=not args.no_progress)


def execute(targets: list[Any], picked: list[Any], opts: Options, out: Path, *, argv: list[str], max_time: float,
            progress: bool) -> int:
    import trio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kcr_trio.bench.report import print_summary, write_report
    from kcr_trio.bench.runner import new_report, run_bench

    console = Console(stderr=True)
    report = new_report(targets, picked, opts, argv)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=False)
    tasks = {}
    for s in picked:
        units = (1 if s.once else opts.runs) * len(s.steps(opts)) * len(targets)
        tasks[s.name] = bar.add_task(s.name, total=units)

    def on_unit(scenario: str, desc: str, done: bool) -> None:
        bar.update(tasks[scenario], description=desc, advance=1 if done else 0)

    code = 0
    try:
        with bar:
            trio.run(lambda: run_bench(report, targets, picked, opts, max_time=max_time, on_unit=on_unit))
    except KeyboardInterrupt:
        from kcr_trio.bench.runner import now_iso, summarize

        report["truncated"], report["truncated_reason"] = True, "interrupted"
        report["finished"] = now_iso()
        for section in report["scenarios"].values():
            section["summary"] = summarize(section, [t.name for t in targets])
        code = 3
    if report.get("truncated"):
        code = 3
    files = write_report(report, out)
    print_summary(report, Console())
    console.print(f"report: {files['markdown']} and {files['json']} ({len(files) - 2} plots) in {out}")
    return code
