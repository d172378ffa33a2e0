"""Resource limits, the scrubbed environment, and the one function that builds a user process.

Every user process (compile step, run step, pre-warmed interpreter) is created by ``spawn_user``:
new session (``setsid``), fixed minimal environment, an unprivileged uid/gid when the sidecar is
root, and rlimits set in the child between ``fork`` and ``exec``. ``user_command`` is the single
place where the final argv is decided: it wraps the command in the sidecar's bubblewrap sandbox
(``sandbox.py``) when one is configured, so the runner never builds sandbox argv itself.

Memory is enforced with ``RLIMIT_AS`` (address space), because it needs no cgroup and works in an
unprivileged pod. Runtimes that reserve far more address space than they use get a larger AS and a
runtime-level cap instead (see ``languages.py``): Node ``--max-old-space-size``, Java ``-Xmx``, Go
``GOMEMLIMIT``.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .cgroups import SH, enter_argv
from .spawn import Child, open_child

if TYPE_CHECKING:
    from .sandbox import Sandbox

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MB = 1024 * 1024
PRLIMIT = shutil.which("prlimit", path=SAFE_PATH)
SETPRIV = shutil.which("setpriv", path=SAFE_PATH)


@dataclass(frozen=True, slots=True)
class Limits:
    """rlimits for one user process. ``None`` leaves a limit as inherited."""

    cpu_seconds: int | None = None
    address_space_mb: int | None = None
    nproc: int | None = None
    file_size_mb: int | None = None
    open_files: int | None = None

    def with_(self, **changes: object) -> Limits:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who user code runs as. ``uid is None`` means "as the sidecar itself" (non-root pods)."""

    uid: int | None = None
    gid: int | None = None
    exclusive: bool = False  # the uid belongs to this sidecar alone: kill(-1) as it is safe

    @property
    def switching(self) -> bool:
        return self.uid is not None


def resolve_identity(run_uid: int, run_gid: int, exclusive: bool) -> Identity:
    """Switch to ``run_uid`` only when we can (root); otherwise run as ourselves."""
    if os.geteuid() == 0 and run_uid != 0:
        return Identity(run_uid, run_gid, exclusive)
    return Identity(None, None, False)


def _resolved(limits: Limits) -> list[tuple[int, str, int]]:
    """``(resource, prlimit option, value)`` with values clamped to our own hard limits (a child
    cannot exceed them unless we are root, and asking would make the spawn fail)."""
    wanted = [
        (resource.RLIMIT_CPU, "cpu", limits.cpu_seconds),
        (resource.RLIMIT_AS, "as", limits.address_space_mb * MB if limits.address_space_mb else None),
        (resource.RLIMIT_NPROC, "nproc", limits.nproc),
        (resource.RLIMIT_FSIZE, "fsize", limits.file_size_mb * MB if limits.file_size_mb else None),
        (resource.RLIMIT_NOFILE, "nofile", limits.open_files),
        (resource.RLIMIT_CORE, "core", 0),
    ]
    out = []
    for which, name, value in wanted:
        if value is None:
            continue
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and os.geteuid() != 0:
            value = min(value, hard)
        out.append((which, name, value))
    return out


def _prlimit_argv(limits: Limits) -> list[str]:
    """``prlimit --cpu=S:H --as=N ... --`` (util-linux): rlimits applied by a tiny exec'd helper.

    Why not ``preexec_fn``: it forces a full ``fork()`` plus Python code in the child, which cost
    7 ms per spawn here against well under 1 ms for one extra exec of a small C program.
    """
    argv = [PRLIMIT or "prlimit"]
    for which, name, value in _resolved(limits):
        # CPU: the soft limit sends SIGXCPU, the hard one SIGKILL a second later.
        argv.append(f"--{name}={value}:{value + 1}" if which == resource.RLIMIT_CPU else f"--{name}={value}")
    return argv + ["--"]


# dash's ``ulimit`` letter and unit (bytes) per rlimit. Only dash: bash names "processes" -u and
# counts file sizes in KiB, so another shell keeps the prlimit exec.
_DASH_ULIMIT = {resource.RLIMIT_CPU: ("t", 1), resource.RLIMIT_AS: ("v", 1024),
                resource.RLIMIT_NPROC: ("p", 1), resource.RLIMIT_FSIZE: ("f", 512),
                resource.RLIMIT_NOFILE: ("n", 1), resource.RLIMIT_CORE: ("c", 512)}
_SH_IS_DASH = os.path.basename(os.path.realpath(SH)) == "dash"


def ulimit_script(limits: Limits) -> str | None:
    """The same rlimits as ``_prlimit_argv``, as dash ``ulimit`` builtins for the control-group
    entry script that already runs before every user process when control groups are on: one
    exec fewer per spawn (prlimit cost ~1 ms of CPU, the builtins nothing). None when the shell
    is not dash or a value has no exact representation in ulimit's units.

    The limits are then set before ``setpriv`` switches the uid instead of after it; rlimits
    survive the switch and every exec, so the user process ends up with exactly the same ones."""
    if not _SH_IS_DASH:
        return None
    cmds = []
    for which, _name, value in _resolved(limits):
        letter, unit = _DASH_ULIMIT[which]
        if value % unit:
            return None
        if which == resource.RLIMIT_CPU:  # soft first (the hard limit is still above it), then hard
            cmds += [f"ulimit -S -t {value}", f"ulimit -H -t {value + 1}"]
        else:
            cmds.append(f"ulimit -{letter} {value // unit}")
    return (" && ".join(cmds) + ' || { echo "kcr-trio: cannot set the run\'s limits" >&2; exit 126; }; '
            if cmds else "")


def _preexec(limits: Limits) -> Callable[[], None]:
    """Fallback without ``prlimit``: set the rlimits in the child between fork and exec."""
    pairs = _resolved(limits)

    def apply() -> None:
        for which, _name, value in pairs:
            resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))

    return apply


def base_env(home: str, tmp: str, extra: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """The complete environment of a user process: nothing is inherited from the sidecar."""
    env = {"PATH": SAFE_PATH, "HOME": home, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


def user_command(spec: SpawnSpec) -> tuple[list[str], dict[str, str]]:
    """The command and environment actually executed for a user process, before the uid switch
    and rlimits are prefixed: the spec's own, or wrapped in the sidecar's bubblewrap sandbox
    (``sandbox.Sandbox.wrap``: bwrap in front, host temp-dir paths translated)."""
    if spec.sandbox is None:
        return list(spec.argv), spec.env
    return spec.sandbox.wrap(spec.argv, spec.env, spec.tmp)


def cpu_limit_for(timeout: float) -> int:
    """CPU seconds for a run with this wall-clock timeout (a backstop; the wall clock rules)."""
    return max(1, math.ceil(timeout)) + 1


@dataclass(slots=True)
class SpawnSpec:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    limits: Limits
    identity: Identity
    stdin: int | None = None  # an fd, or None for /dev/null
    pass_fd: int | None = None  # an fd the child inherits under the same number (pre-warm socket)
    sandbox: Sandbox | None = None  # bubblewrap view (sidecar.sandbox), or None: unsandboxed
    tmp: str | None = None  # the run's private temp dir (mounted at /run/kcr when sandboxed)
    cgroup_procs: list[str] | None = None  # cgroup.procs files to enter before exec (cgroups.py)


async def spawn_user(spec: SpawnSpec) -> Child:
    """Start one user process with stdout/stderr pipes. Raises OSError if it cannot start.

    Started from the Trio thread itself (``spawn.open_child``), never a worker thread: bubblewrap's
    ``--die-with-parent`` binds the sandbox's life to the thread that forked it."""
    import subprocess

    kwargs: dict[str, object] = {}
    prefix: list[str] = []
    if spec.identity.switching:
        if SETPRIV and PRLIMIT:
            # Switching uid in Popen (user=) forbids vfork: a full fork of the sidecar costs several
            # ms. util-linux's setpriv does it after a cheap vfork+exec, and sets no_new_privs so
            # setuid binaries cannot give user code its privileges back.
            prefix = [SETPRIV, f"--reuid={spec.identity.uid}", f"--regid={spec.identity.gid}",
                      "--clear-groups", "--no-new-privs", "--"]
        else:
            kwargs.update(user=spec.identity.uid, group=spec.identity.gid, extra_groups=[])
    command, env = user_command(spec)
    script = ulimit_script(spec.limits) if spec.cgroup_procs else None
    if spec.cgroup_procs:  # first, as the sidecar: then nothing the run starts is outside the group
        prefix = enter_argv(spec.cgroup_procs, script or "") + prefix
    if script is not None:  # the entry script set the limits
        argv = prefix + command
    elif PRLIMIT:
        argv = prefix + _prlimit_argv(spec.limits) + command
    else:
        argv = command
        kwargs["preexec_fn"] = _preexec(spec.limits)
    return await open_child(
        argv,
        stdin=spec.stdin if spec.stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=spec.cwd,
        env=env,
        start_new_session=True,
        pass_fds=(spec.pass_fd,) if spec.pass_fd is not None else (),
        close_fds=True,
        umask=0o022,
        **kwargs,
    )


def reachable_by(path: str, uid: int, gid: int) -> bool:
    """True if ``uid``/``gid`` may traverse every directory from ``/`` down to ``path``.

    Interpreters such as ``python3 code.py`` and ``php code.php`` open their script by absolute
    path, so a working directory below a private parent (``/root``, a 0700 temp dir) breaks them
    even though the process's cwd was set before it dropped privileges.
    """
    import stat as _stat

    current = os.path.abspath(path)
    parts = []
    while True:
        parts.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for p in parts:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & _stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & _stat.S_IXGRP
        else:
            ok = st.st_mode & _stat.S_IXOTH
        if not ok:
            return False
    return True
