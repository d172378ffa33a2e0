"""``proctree.descendants`` while processes exit and their children move up to the subreaper.

The sidecar is a child subreaper: when a program exits, the kernel moves its children up to the
sidecar. A single top-down walk can read the sidecar's list before the move and the exiting
parent's after it, and miss those children entirely; the kill sweep then calls a tree with live
processes "clean" and they outlive the run (a fork bomb's sleeping children did, about once in
four runs). The window is the kernel's, so this test repeats the exit many times: with one walk,
about one trial in twenty missed the children here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.sidecar import REPO

TRIALS = 150
SCRIPT = r"""
import ctypes, os, sys, time
from sidecar import proctree

ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as the sidecar does
me, trials, kids, misses = os.getpid(), int(sys.argv[1]), 20, 0


def trial():
    global misses
    r, w = os.pipe()
    parent = os.fork()
    if parent == 0:
        for _ in range(kids):
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
        os.write(w, b"x")
        os._exit(0)
    os.read(r, 1)  # the parent has its children and is about to exit: walk across the exit
    os.close(r)
    os.close(w)
    while True:
        if len(proctree.descendants(me) - {parent}) < kids:
            misses += 1
            break
        try:
            with open(f"/proc/{parent}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # exit complete: the children have moved
        except OSError:
            break
    os.waitpid(parent, 0)
    proctree.kill_tree(me, grace=0)
    proctree.reap_orphans(set())


try:
    for _ in range(trials):
        trial()
finally:  # whatever happens, no sleeper outlives this script (a forked child never sweeps)
    if os.getpid() == me:
        proctree.kill_tree(me, grace=0)
        proctree.reap_orphans(set())
print(misses)
"""


@pytest.mark.slow
def test_descendants_never_loses_children_moving_up_to_the_subreaper() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(TRIALS)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 0, f"{out.stdout.strip()} of {TRIALS} walks missed live children"
