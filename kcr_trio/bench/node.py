"""Run LibreChat's real HTTP sequence (axios GET, then node-fetch POST /exec on one socket) in Node.

The script and its ``node_modules`` (axios, node-fetch 2) live in the repository's ``tests/node``;
an installed copy of kcr-trio has no tests, so operators pass ``--node-dir`` (a directory holding
``librechat_sequence.js`` and its ``node_modules``) or set ``KCR_BENCH_NODE_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import trio

from kcr_trio.bench.targets import Target

SCRIPT = "librechat_sequence.js"
HANGUP_MARKERS = ("socket hang up", "Premature close", "ECONNRESET", "EPIPE", "aborted")


def find_node_dir(explicit: Path | None) -> Path | None:
    candidates = [explicit] if explicit else []
    if os.environ.get("KCR_BENCH_NODE_DIR"):
        candidates.append(Path(os.environ["KCR_BENCH_NODE_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "tests" / "node")
    for d in candidates:
        if d and (d / SCRIPT).is_file() and (d / "node_modules" / "axios").is_dir():
            return d
    return None


def node_problem(explicit: Path | None) -> str | None:
    """Why the Node sequence cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if find_node_dir(explicit) is None:
        return f"no {SCRIPT} with node_modules (pass --node-dir or set KCR_BENCH_NODE_DIR)"
    return None


def classify(result: dict[str, Any], expect_stdout: str) -> str:
    """``ok`` | ``hangup`` (the 5 s signature: reset/closed socket) | ``error`` (anything else)."""
    if result.get("ok") and str((result.get("body") or {}).get("stdout", "")).strip() == expect_stdout.strip():
        return "ok"
    err = str(result.get("error", ""))
    if any(m in err for m in HANGUP_MARKERS):
        return "hangup"
    return "error"


async def run_sequence(target: Target, code: str, *, node_dir: Path | None, idle_ms: int = 0,
                       timeout: float = 60.0) -> dict[str, Any]:
    """One Node process, one sequence; returns its JSON line (or an ``error`` entry)."""
    d = find_node_dir(node_dir)
    if d is None or shutil.which("node") is None:
        return {"ok": False, "error": f"node unavailable: {node_problem(node_dir)}"}
    argv = ["node", str(d / SCRIPT), target.url, target.key or "", code, "py", str(idle_ms)]
    result: dict[str, Any] = {"ok": False, "error": f"node sequence did not finish within {timeout}s"}
    with trio.move_on_after(timeout):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        try:
            result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"ok": False, "error": f"node exited {done.returncode}: {done.stderr.decode()[-300:]}"}
    return result
