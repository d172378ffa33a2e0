"""The pod-reclaim benchmark (``python3 -m tests.support.kube_reclaim``) still runs end to end.

It left the shipped ``kcr_trio.bench`` (it drives the executor and the emulator directly); this
keeps it from rotting in its new home. One round against the emulator, figures only checked for
shape and sign: speed belongs to the benchmark itself, not to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_one_reclaim_round_reports_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.kube_reclaim", "--runs", "1", "--pool", "1", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    for key in ("program_killed", "delete_sent", "pod_deleted", "replacement_ready"):
        assert summary[key]["n"] == 1 and summary[key]["median_ms"] >= 0, (key, summary)
