"""What scenarios produce and what the runner hands them.

A scenario is split into *steps* (a language, a concurrency level, a file size...). The runner walks
``for rep: for step: for target`` so A and B alternate at the finest grain and machine drift hits
both alike. Each call returns a ``StepResult``: raw samples (kept in full in the JSON report) and
per-run scalar *figures*; the summary takes the median of each figure over runs, with min/max/IQR as
the run-to-run spread, and the ratio of every target to the first.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kcr_trio.bench.targets import Target


@dataclass
class StepResult:
    samples: dict[str, list[float]] = field(default_factory=dict)  # series -> raw values (ms, s, ...)
    figures: dict[str, float | None] = field(default_factory=dict)  # per-run scalars (None: no data): "p50 ms", "req/s", ...
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able details (conformance table, ...)
    errors: list[str] = field(default_factory=list)  # first few error texts (count is a figure)

    def error(self, text: str, limit: int = 20) -> None:
        if len(self.errors) < limit:
            self.errors.append(text[:300])


@dataclass
class RunRecord:
    scenario: str
    step: str
    target: str
    rep: int
    started: float  # epoch seconds
    seconds: float
    result: StepResult


@dataclass
class Options:
    """Every knob a scenario reads; the CLI fills it, tests build it directly."""

    runs: int = 3
    duration: float = 5.0  # seconds per timed window (concurrency, files-rps, slow-clients)
    requests: int = 20  # max requests per run where a count is the bound (exec-latency)
    warmup: int = 2
    timeout: float = 60.0  # per HTTP request
    languages: list[str] = field(default_factory=lambda: ["py"])
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    max_requests_per_window: int = 5000
    sizes: list[int] = field(default_factory=lambda: [1024, 1024 * 1024, 10 * 1024 * 1024])
    uploads_per_run: int = 3
    keepalive_seconds: float = 8.0
    keepalive_clients: int = 3
    storm_clients: int = 8
    storm_run_seconds: float = 10.0
    storm_leave: tuple[float, float] = (0.5, 3.0)
    proc_watch: str = "auto"  # auto (loopback targets) | on | off
    idle_connections: int = 50
    slow_senders: int = 10
    slow_interval: float = 0.5
    files_concurrency: list[int] = field(default_factory=lambda: [4])
    conformance_max_file_mb: int | None = 10
    conformance_skip: list[str] = field(default_factory=list)
    check_timeout: float = 75.0
    node_dir: Path | None = None
    http_routes: list[str] = field(default_factory=lambda: ["health", "files", "upload-1k", "upload-10m", "download-10m"])
    http_concurrency: list[int] = field(default_factory=lambda: [1, 16])
    seed: int = 1


class Context:
    def __init__(self, opts: Options, advance: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self._advance = advance or (lambda _desc: None)
        self.cache: dict[Any, Any] = {}

    def progress(self, desc: str) -> None:
        self._advance(desc)


class Scenario(Protocol):
    name: str
    title: str
    once: bool  # run a single repetition whatever --runs says (conformance)

    def steps(self, opts: Options) -> list[str]: ...

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult: ...
