"""What a host that runs sidecars on its own machine needs from the sidecar package: its one
public surface for ``kcr_trio.backends.local_executor``.

The sidecar ships alone in language images and keeps its internals (runner, limits, proctree,
sandbox argv) free to change; the local executor starts sidecar processes, gives each a control
group, a uid and a curated ``/etc`` view, and kills a sidecar's whole tree when destroying it. Those
needs are exactly what this module exports, so the arrow from the backends into the sidecar
points at one module (pinned by ``tests/unit/test_import_graph.py``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from . import proctree, sandbox
from .cgroups import PREFIX as CGROUP_PREFIX
from .cgroups import Cgroups, Group
from .cgroups import detect as detect_cgroups
from .cgroups import sweep_stale as sweep_stale_cgroups
from .languages import Toolchain
from .limits import reachable_by
from .prewarm import remove_tree
from .sandbox import EXTRA_PROCESSES, build_etc_view, etc_entries, split_paths
from .toolchains import availability

__all__ = [
    "CGROUP_PREFIX", "EXTRA_PROCESSES", "Cgroups", "Group", "Toolchain", "availability",
    "build_etc_view", "count_tasks_of_uid", "detect_cgroups", "etc_entries", "kill_sidecar",
    "package_parent", "probe", "reachable_by", "remove_tree", "split_paths", "sweep_stale_cgroups",
]

count_tasks_of_uid = proctree.count_tasks_of_uid


def probe(**kwargs: Any) -> str | None:
    """``sandbox.probe``: one trivial sandboxed run; None if bubblewrap works here, else why not.
    (Looked up at call time, so a test can stand in for the real probe.)"""
    return sandbox.probe(**kwargs)


def package_parent() -> str:
    """The directory holding the ``sidecar`` package: the ``PYTHONPATH`` a sidecar process needs."""
    return str(Path(__file__).resolve().parents[1])


def kill_sidecar(pid: int, alive: bool, uid: int | None) -> None:
    """Kill a sidecar (``alive``: it still runs) and everything below it, then every process of
    its run uid (``uid``: the sandbox's own, exclusive uid) that escaped the tree. Blocking.

    The sidecar is a subreaper, so every process its runs started is still below it; it is
    stopped first so it cannot start anything new meanwhile."""
    if alive:
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass
        proctree.kill_tree(pid, grace=0.0)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if uid is not None:
        proctree.kill_uid(uid, uid)
