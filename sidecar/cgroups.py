"""A memory and process bound for a whole run, from a control group per sandbox slot.

Why: rlimits bind each process, not the run. Under ``MAX_MEMORY_MB=512`` one run forked six
children of 400 MB each and held 2.4 GB. A control group with a memory limit (v2 ``memory.max``,
v1 ``memory.limit_in_bytes``) and a task limit (``pids.max``) bounds everything the run starts,
whatever it forks; the kernel's OOM killer stops the run when it goes over, and the group's
``oom_kill`` counter lets the sidecar say so clearly.

Which hierarchy (detected once at start-up, reported in ``/ready``):

* **v2** when the unified hierarchy offers ``memory`` and ``pids`` below our own group and we may
  enable them for a child (a delegated subtree: a Kubernetes node, ``systemd`` with
  ``Delegate=yes``). The no-internal-processes rule forbids enabling controllers in a group that
  still holds processes, so the server moves itself into a leaf (``kcr-trio-server``) when it is
  the only process there.
* **v1** when the ``memory`` and ``pids`` controllers are mounted separately (a hybrid host) and we
  may create groups below our own (root).
* otherwise **none**: only the per-process rlimits apply, and ``/ready`` and the README say so.

Groups live below the server's own group (its limits still apply on top) as
``kcr-trio-<server pid>/<slot>/{run,compile}``: the program's steps enter ``run`` (``MAX_MEMORY_MB``,
``MAX_PIDS``), compile steps enter ``compile`` (their own, larger bound). A slot serves one run at a
time and every process of a run is killed before the next starts, so the slot's group is the run's
group. A user process enters its group before it executes anything (``spawn_user`` prefixes a tiny
shell that writes its own pid to ``cgroup.procs`` and then ``exec``s the command), so nothing it
forks can start outside.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, field

ROOT = "/sys/fs/cgroup"
PREFIX = "kcr-trio-"
# argv prefix: enter every group named before "--", then exec the rest (pid stays the same).
ENTER = ('p=$$; while [ "$1" != -- ]; do echo "$p" > "$1" || { echo "kcr-trio: cannot enter the '
         'run\'s control group $1" >&2; exit 126; }; shift; done; shift; exec "$@"')
SH = shutil.which("sh", path="/usr/bin:/bin") or "/bin/sh"


def enter_argv(procs_files: list[str], prelude: str = "") -> list[str]:
    """The prefix that puts the process into ``procs_files``' groups before ``exec``; ``prelude``
    (shell commands ending in ``;``, e.g. ``limits.ulimit_script``) runs first."""
    return [SH, "-c", prelude + ENTER, "kcr-cgroup", *procs_files, "--"]


@dataclass
class Group:
    """One bounded group (in v1: one directory per controller)."""

    version: str
    dirs: list[str]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    @property
    def memory_dir(self) -> str:
        return self.dirs[0]

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this group so far (read twice per run,
        on its answer's path: one raw read, no text layer)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            fd = os.open(os.path.join(self.memory_dir, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
            for line in data.splitlines():
                key, _, value = line.partition(b" ")
                if key == b"oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


@dataclass
class Cgroups:
    """What start-up found: ``version`` ``"v2"``, ``"v1"`` or ``None`` (and why)."""

    version: str | None
    detail: str
    bases: list[str] = field(default_factory=list)  # v2: [group]; v1: [memory group, pids group]

    def status(self) -> dict[str, object]:
        return {"cgroup": self.version, "detail": self.detail}

    def create(self, name: str, memory_mb: int, pids: int) -> Group:
        """``<base>/<name>`` bounded to ``memory_mb`` (no swap beyond it) and ``pids`` tasks."""
        if self.version is None:
            raise OSError(errno.ENOTSUP, "no control group hierarchy available")
        dirs = []
        for base in self.bases:
            path = os.path.join(base, name)
            os.makedirs(path, exist_ok=True)
            dirs.append(path)
        limit = memory_mb * 1024 * 1024
        if self.version == "v2":
            _write(dirs[0], "memory.max", str(limit))
            _write(dirs[0], "memory.swap.max", "0", optional=True)
            _write(dirs[0], "pids.max", str(pids))
        else:
            _write(dirs[0], "memory.limit_in_bytes", str(limit))
            _write(dirs[0], "memory.memsw.limit_in_bytes", str(limit), optional=True)
            _write(dirs[1], "pids.max", str(pids))
        return Group(self.version, dirs)

    def remove(self, name: str) -> None:
        """Remove ``<base>/<name>`` and the groups below it (they must hold no process)."""
        for base in self.bases:
            _rmdir_tree(os.path.join(base, name))


def _write(directory: str, name: str, value: str, optional: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(value)
    except OSError:
        if not optional:
            raise


def _rmdir_tree(path: str) -> None:
    """``rmdir`` a group and its children, deepest first (cgroupfs has no files to delete)."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmdir_tree(entry.path)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """``(mount point, fstype, super options)`` of every cgroup/cgroup2 mount."""
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
            out.append((parts[4], rparts[0], set(rparts[2].split(","))))
    return out


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """``{controller or "": path}`` from ``/proc/self/cgroup`` ("" is the v2 line)."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        m = re.fullmatch(r"\d+:([^:]*):(.*)", line.strip())
        if m:
            for ctl in m.group(1).split(",") if m.group(1) else [""]:
                out[ctl] = m.group(2)
    return out


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _probe(bases: list[str], tag: str) -> None:
    """Create and remove one group in each base: raises OSError if we may not."""
    made = []
    try:
        for base in bases:
            path = os.path.join(base, f"{PREFIX}probe-{tag}")
            os.mkdir(path)
            made.append(path)
    finally:
        for path in made:
            os.rmdir(path)


def _try_v2(mount: str, own: str, pid: int) -> tuple[list[str] | None, str]:
    base = os.path.normpath(mount + own)
    try:
        available = _read(os.path.join(base, "cgroup.controllers")).split()
    except OSError as exc:
        return None, f"cgroup v2 at {mount}: {exc.strerror}"
    if not {"memory", "pids"} <= set(available):
        return None, f"cgroup v2 at {mount} offers no memory/pids controllers here"
    control = os.path.join(base, "cgroup.subtree_control")
    try:
        enabled = set(_read(control).split())
        if not {"memory", "pids"} <= enabled:
            try:
                _write(base, "cgroup.subtree_control", "+memory +pids")
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # Processes in our group: move ourselves into a leaf, if we are the only one.
                procs = _read(os.path.join(base, "cgroup.procs")).split()
                if procs != [str(pid)]:
                    return None, (f"cgroup v2 group {own} holds other processes; delegate a subtree "
                                  "to kcr-trio to get a per-run memory bound")
                leaf = os.path.join(base, f"{PREFIX}server")
                os.makedirs(leaf, exist_ok=True)
                _write(leaf, "cgroup.procs", str(pid))
                _write(base, "cgroup.subtree_control", "+memory +pids")
        _probe([base], str(pid))
    except OSError as exc:
        return None, f"cgroup v2 at {base}: {exc.strerror or exc}"
    return [base], f"cgroup v2 below {base}"


def _try_v1(mounts: list[tuple[str, str, set[str]]], own: dict[str, str], pid: int
            ) -> tuple[list[str] | None, str]:
    bases = []
    for ctl in ("memory", "pids"):
        mount = next((m for m, kind, opts in mounts if kind == "cgroup" and ctl in opts), None)
        if mount is None:
            return None, f"no cgroup v1 {ctl} controller mounted"
        bases.append(os.path.normpath(mount + own.get(ctl, "/")))
    try:
        _probe(bases, str(pid))
    except OSError as exc:
        return None, f"cgroup v1: cannot create groups below {bases[0]} ({exc.strerror or exc})"
    return bases, f"cgroup v1 below {bases[0]} and {bases[1]}"


def detect(pid: int | None = None, *, mountinfo: str | None = None, proc_cgroup: str | None = None,
           disabled: bool = False) -> Cgroups:
    """Find a hierarchy where we can bound each run (blocking: a few small file operations)."""
    if disabled:
        return Cgroups(None, "per-run control groups disabled (KCR_LOCAL_CGROUPS=false)")
    pid = os.getpid() if pid is None else pid
    try:
        mountinfo = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
        proc_cgroup = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    except OSError as exc:
        return Cgroups(None, f"cannot read the control group layout: {exc.strerror}")
    mounts = _mounts(mountinfo)
    own = _own_paths(proc_cgroup)
    reasons = []
    v2 = next((m for m, kind, _ in mounts if kind == "cgroup2"), None)
    if v2 is not None and "" in own:
        bases, why = _try_v2(v2, own[""], pid)
        if bases:
            return Cgroups("v2", why, bases)
        reasons.append(why)
    bases, why = _try_v1(mounts, own, pid)
    if bases:
        return Cgroups("v1", why, bases)
    reasons.append(why)
    return Cgroups(None, "; ".join(reasons) + ": only per-process limits apply (RLIMIT_AS, RLIMIT_NPROC)")


def sweep_stale(cg: Cgroups) -> None:
    """Remove groups left by servers that are gone (a SIGKILLed server cannot clean up)."""
    for base in cg.bases:
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for name in entries:
            m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                _rmdir_tree(os.path.join(base, name))
