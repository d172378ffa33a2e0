"""Sidecar settings from the command line and the environment.

Environment names follow KubeCodeRun's sidecar and Go runner where they exist (``LANGUAGE``,
``WORKING_DIR``, ``SIDECAR_PORT``/``RUNNER_PORT``, ``MAX_EXECUTION_TIME``, ``MAX_OUTPUT_SIZE``), so
our sidecar can be dropped into their pod specs; everything else is ``SIDECAR_<FLAG>`` (e.g.
``SIDECAR_MAX_MEMORY_MB``). Command-line flags win over the environment.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields


def _bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


@dataclass(slots=True)
class Config:
    language: str = "py"
    host: str = "0.0.0.0"
    port: int = 8080
    fd: int | None = None  # an already-listening socket inherited from the parent
    lifeline_fd: int | None = None  # read end of a pipe the parent holds open: EOF = parent gone
    sandbox_etc_view: str = ""  # a prepared /etc view (sandbox.build_etc_view); "": build our own
    working_dir: str = "/mnt/data"
    max_execution_time: float = 600.0  # KubeCodeRun caps at 120 s; we allow the API's maximum
    default_timeout: float = 30.0
    max_output_size: int = 1024 * 1024  # bytes per stream kept in the response
    output_kill_factor: int = 16  # stop a program whose stream exceeds factor × max_output_size
    max_memory_mb: int = 512
    max_pids: int = 64
    max_open_files: int = 256
    max_file_size_mb: int = 100  # RLIMIT_FSIZE for user code and the upload size limit
    disk_quota_mb: int = 512  # bytes a run may add to working dir + private tmp
    cgroup_version: str = ""  # v1 | v2 | "" (none): the groups below, made by the executor
    cgroup_run: str = ""  # comma-separated group dirs the program's steps enter (one per v1 controller)
    cgroup_compile: str = ""  # the same for compile steps
    compile_file_size_mb: int = 2048  # RLIMIT_FSIZE for compile steps (linkers write big files)
    compile_cpu_factor: int = 4  # compile steps: RLIMIT_CPU = factor x the run's (threaded compilers)
    compile_timeout: float = 0.0  # wall-clock budget of a run's compile steps; 0: the run's timeout
    max_files: int = 4096  # directory entries a run may create
    prewarm: bool = True
    reset_between_runs: bool = False  # the next interpreter waits for POST /reset (local executor)
    python_preimports: str = ""
    python: str | None = None  # interpreter for user code (default: python3 on the fixed PATH)
    node_path: str | None = None  # NODE_PATH for ts (where the `typescript` package lives)
    run_uid: int = 65534  # only used when the sidecar runs as root
    run_gid: int = 65534
    run_uid_exclusive: bool = False  # this uid is ours alone: enables the kill(-1) sweep
    tmp_root: str = ""  # where private per-run temp dirs go (default: the system temp dir)
    node_snapshot_dir: str = ""  # where the pre-warmed js interpreter's start-up snapshot lives
    announce: bool = False  # print one JSON line with port/pid to stdout once ready
    kill_grace_ms: int = 20
    max_body_mb: int = 16  # /execute request body
    sandbox: str = "none"  # none | bwrap | auto: wrap user processes in bubblewrap (sandbox.py)
    sandbox_allow_network: bool = False  # keep the host network inside the sandbox
    sandbox_ro_paths: str = ""  # extra host paths, read-only inside the sandbox (colon-separated)
    sandbox_bwrap: str = ""  # the bwrap executable (default: bwrap on the fixed PATH)

    def __post_init__(self) -> None:
        if not self.tmp_root:
            self.tmp_root = tempfile.gettempdir()


_ENV_ALIASES = {
    "language": ("LANGUAGE",),
    "working_dir": ("WORKING_DIR",),
    "port": ("SIDECAR_PORT", "RUNNER_PORT"),
    "max_execution_time": ("MAX_EXECUTION_TIME",),
    "max_output_size": ("MAX_OUTPUT_SIZE",),
}


_HELP = {
    "language": "py js ts go java c cpp php rs r f90 d bash (env LANGUAGE)",
    "port": "TCP port (env SIDECAR_PORT or RUNNER_PORT); 0 picks a free one",
    "fd": "serve this inherited, already-listening socket instead of binding",
    "working_dir": "where programs run and files live (env WORKING_DIR)",
    "max_execution_time": "largest accepted timeout in seconds (env MAX_EXECUTION_TIME)",
    "default_timeout": "timeout when a request gives none",
    "max_output_size": "bytes kept per output stream (env MAX_OUTPUT_SIZE)",
    "output_kill_factor": "stop a program whose stream exceeds this many times the cap",
    "max_memory_mb": "memory per program (see README for per-language enforcement)",
    "max_pids": "RLIMIT_NPROC for programs",
    "max_open_files": "RLIMIT_NOFILE for programs",
    "max_file_size_mb": "RLIMIT_FSIZE for programs, and the upload size limit",
    "cgroup_version": "v1 or v2: user processes enter the control groups below (made and bounded "
                      "by the caller), so memory and tasks are bounded for the whole run",
    "cgroup_run": "comma-separated control group directories for the program's steps",
    "cgroup_compile": "comma-separated control group directories for compile steps",
    "compile_file_size_mb": "RLIMIT_FSIZE for compile steps (trusted compilers and linkers; "
                            "the program keeps max_file_size_mb)",
    "compile_cpu_factor": "compile steps get this many times the program's CPU-seconds limit",
    "compile_timeout": "seconds all compile steps of one run may take together, separate from the "
                       "program's timeout (which starts when they are done); 0: the compile steps "
                       "share the run's timeout (KubeCodeRun's behaviour)",
    "disk_quota_mb": "bytes a run may add to working dir + private temp dir",
    "max_files": "directory entries a run may create",
    "prewarm": "keep the next interpreter started while idle (py js ts bash)",
    "reset_between_runs": "serve many runs, one at a time: after each run the next interpreter is "
                          "started only by POST /reset, which first kills every process of the run "
                          "(tree and uid sweep) and replaces the working directory with a fresh one",
    "python_preimports": "comma-separated modules the pre-warmed Python imports",
    "python": "interpreter for user Python code (default: python3 on the fixed PATH)",
    "node_path": "NODE_PATH for programs; must contain the typescript package for ts",
    "run_uid": "uid for user code when the sidecar runs as root",
    "run_gid": "gid for user code when the sidecar runs as root",
    "run_uid_exclusive": "the uid is this sidecar's alone: also sweep it with kill(-1)",
    "tmp_root": "parent of the per-run private temp dirs",
    "node_snapshot_dir": "pre-warmed js starts from a Node start-up snapshot kept here (built once "
                         "per directory; same filesystem as tmp_root: runs get a hard link); empty: "
                         "no snapshot (node -e)",
    "lifeline_fd": "an inherited pipe's read end whose write end only the parent holds: when it "
                   "reaches EOF (the parent exited or was killed, even by SIGKILL) the sidecar shuts "
                   "down and kills every process of its runs",
    "announce": "print one JSON line with port and pid on stdout once ready",
    "kill_grace_ms": "SIGTERM-to-SIGKILL grace when killing a run",
    "max_body_mb": "largest /execute request body",
    "sandbox": "none: no sandbox (pods: the pod is the sandbox); bwrap: every user process in a "
               "bubblewrap sandbox with the working dir at /mnt/data, refuse to start if bwrap "
               "does not work; auto: bwrap when it works, else none with a warning",
    "sandbox_allow_network": "keep network access inside the sandbox",
    "sandbox_ro_paths": "extra host paths visible read-only inside the sandbox (colon-separated)",
    "sandbox_bwrap": "the bwrap executable (default: bwrap on the fixed PATH)",
    "sandbox_etc_view": "a directory prepared by sidecar.sandbox.build_etc_view, bound read-only as "
                        "/etc (the local executor builds one per server); empty: the sidecar copies "
                        "the curated /etc entries into its own temp root at start-up",
}


def _converter(name: str, default: object) -> Callable[[str], object]:
    if isinstance(default, bool):
        return _bool
    if name in ("fd", "lifeline_fd"):
        return int
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    defaults = Config()
    parser = argparse.ArgumentParser(prog="sidecar", description="kcr-trio execution sidecar")
    for f in fields(Config):
        default = getattr(defaults, f.name)
        conv = _converter(f.name, default)
        env_value = None
        for env_name in _ENV_ALIASES.get(f.name, ()) + (f"SIDECAR_{f.name.upper()}",):
            if environ.get(env_name):
                env_value = environ[env_name]
                break
        value = conv(env_value) if env_value is not None else default
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{_HELP.get(f.name, '')} [default: {default!r}]".strip()
        if conv is _bool:
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=value, help=help_)
        else:
            parser.add_argument(flag, type=conv, default=value, help=help_)
    ns = parser.parse_args(list(argv))
    return Config(**vars(ns))
