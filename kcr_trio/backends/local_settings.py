"""The local executor's settings and start-up decisions: ``KCR_LOCAL_*``, whether sandboxes use
bubblewrap (``KCR_SANDBOX``), where their directories live and where Node finds ``typescript``.

Separate from the executor because these are decided once, before any sidecar starts (some are
blocking probes run in a thread), and the unit tests of the sandbox policy import them alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.config import Settings
from sidecar import host
from sidecar.host import reachable_by, split_paths


class LocalExecutorSettings(BaseSettings):
    """Settings only the local executor reads (``KCR_LOCAL_*``)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", case_sensitive=False,
                                      extra="ignore")

    # Root only: sandbox i runs user code as uid/gid base+i (unused ids; nothing else may use them).
    kcr_local_run_uid_base: int = 2_000_000_000
    kcr_local_start_timeout: float = 30.0
    kcr_local_node_path: str | None = None  # where the `typescript` package lives (NODE_PATH)
    kcr_local_python: str | None = None  # interpreter for user Python code (default: python3 on PATH)
    kcr_local_disk_quota_mb: int = 512  # bytes one run may add to its directories
    kcr_local_max_output_bytes: int = 1024 * 1024  # per stream, kept by the sidecar (before the API cap)
    # Extra host paths user code may read inside the bubblewrap sandbox (colon-separated), e.g. a
    # toolchain installed under /opt. /usr, a curated /etc, the Python prefix and NODE_PATH are
    # always visible.
    kcr_local_sandbox_ro_paths: str = ""
    kcr_local_bwrap: str = ""  # the bwrap executable (default: bwrap on the standard PATH)
    # One sidecar serves many runs, one at a time, reset in between (see LocalExecutor._reset).
    kcr_local_max_runs_per_sidecar: int = 1000
    # A control group per sandbox slot bounds each run's memory (MAX_MEMORY_MB) and tasks (MAX_PIDS)
    # as a whole (sidecar/cgroups.py); compile steps get their own group with this bound.
    kcr_local_cgroups: bool = True
    kcr_local_compile_memory_mb: int = 4096
    kcr_local_reset_timeout: float = 10.0


class SandboxUnavailable(RuntimeError):
    """The local executor refuses to start: no working sandbox and unsandboxed use not allowed."""


_UNSANDBOXED = ("UNSANDBOXED: the local executor runs user code WITHOUT a sandbox ({why}); programs "
                "can read the server's files and environment and reach the network. Only for trusted "
                "code (KCR_UNSANDBOXED_TRUSTED=true).")


def decide_sandbox(settings: Settings, local: LocalExecutorSettings) -> tuple[bool, str | None]:
    """``(sandboxed, warning)`` for ``KCR_SANDBOX``; raises ``SandboxUnavailable`` to refuse.

    ``auto``: bubblewrap when a probe run works, else unsandboxed only with
    ``KCR_UNSANDBOXED_TRUSTED``; ``bwrap``: bubblewrap or refuse; ``none``: unsandboxed, and only
    with ``KCR_UNSANDBOXED_TRUSTED``. Blocking (runs one sandboxed ``sh``): call it in a thread.
    """
    mode = settings.kcr_sandbox
    trusted = settings.kcr_unsandboxed_trusted
    if mode == "none":
        if not trusted:
            raise SandboxUnavailable("KCR_SANDBOX=none runs user code without a sandbox; set "
                                     "KCR_UNSANDBOXED_TRUSTED=true to allow that (trusted code only)")
        return False, _UNSANDBOXED.format(why="KCR_SANDBOX=none")
    # As root, probe as an unprivileged uid, as the sandboxes will run (nobody: it runs only `sh`).
    uid = 65534 if os.geteuid() == 0 else None
    error = host.probe(allow_network=settings.kcr_sandbox_allow_network,
                  ro_paths=split_paths(local.kcr_local_sandbox_ro_paths), uid=uid, gid=uid,
                  bwrap=local.kcr_local_bwrap or None)
    if error is None:
        return True, None
    if mode == "bwrap" or not trusted:
        hint = "" if mode == "bwrap" else (" Install bubblewrap and enable unprivileged user namespaces, "
                                           "or set KCR_UNSANDBOXED_TRUSTED=true for trusted code only.")
        raise SandboxUnavailable(f"the bubblewrap sandbox does not work here ({error}); refusing to "
                                 f"start the local executor (KCR_SANDBOX={mode}).{hint}")
    return False, _UNSANDBOXED.format(why=error)


def sandbox_root(settings: Settings, uid_probe: int | None) -> tuple[Path, str | None]:
    """``<KCR_DATA_DIR>/sandboxes``, unless the run uids cannot reach it (e.g. below ``/root``)."""
    root = Path(settings.kcr_data_dir) / "sandboxes"
    root.mkdir(parents=True, exist_ok=True)
    if uid_probe is None:
        return root, None
    os.chmod(root, 0o711)
    if reachable_by(str(root), uid_probe, uid_probe):
        return root, None
    fallback = Path(tempfile.gettempdir()) / f"kcr-trio-sandboxes-{os.getuid()}"
    fallback.mkdir(mode=0o711, exist_ok=True)
    os.chmod(fallback, 0o711)
    warning = (f"{root} is not reachable by the sandbox uids (a parent directory is private); "
               f"local sandboxes use {fallback} instead")
    return fallback, warning


def node_path(local: LocalExecutorSettings) -> str | None:
    if local.kcr_local_node_path:
        return local.kcr_local_node_path
    if os.environ.get("NODE_PATH"):
        return os.environ["NODE_PATH"]
    paths = ["/usr/local/lib/node_modules", "/usr/lib/node_modules"]
    checkout = Path(__file__).resolve().parents[2] / "tests" / "node" / "node_modules"
    if (checkout / "typescript").is_dir():  # a source checkout with the test clients installed
        paths.append(str(checkout))
    return ":".join(paths)
