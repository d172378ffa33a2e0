"""Sidecar processes on this host: start one, tie it to this server, kill it and all it left.

The process half of the local executor (``local_executor.LocalExecutor`` adds the pools and the
``Executor`` protocol on top). Each sidecar is a ``python -m sidecar`` process with its own working
directory under ``<KCR_DATA_DIR>/sandboxes/`` and (when we run as root) its own uid, so concurrent
sandboxes cannot signal or read each other and ``RLIMIT_NPROC`` counts only their own processes.

Start-up cannot race: we bind the listening socket ourselves and pass the fd to the child
(``--fd``); a request sent before the child runs simply waits in the kernel's accept backlog. The
child prints one JSON line once it serves and its interpreter is pre-warmed. Every sidecar holds
the read end of a lifeline pipe whose write end only this server holds, so it shuts down once the
server is gone (also after a SIGKILL). Destroying one is shielded and bounded: SIGSTOP, kill its
whole process tree, SIGKILL, sweep its uid, remove its directory and control groups.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from kcr_trio.config import Settings
from kcr_trio.core.errors import Unavailable
from sidecar import host
from sidecar.host import (
    CGROUP_PREFIX,
    EXTRA_PROCESSES,
    Cgroups,
    Toolchain,
    availability,
    build_etc_view,
    etc_entries,
    remove_tree,
    split_paths,
)

from . import sandbox_dirs
from .local_settings import LocalExecutorSettings, node_path, sandbox_root
from .sidecar_wire import SidecarWire

log = logging.getLogger("kcr_trio.local_executor")


@dataclass(eq=False)
class LocalSidecar:
    """One running ``python -m sidecar`` process: its port, directory and run uid."""

    language: str
    process: trio.Process
    port: int
    directory: Path
    uid: int | None
    runs: int = 0
    _wire: SidecarWire | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def wire(self) -> SidecarWire:
        """The kept-alive connection for this sidecar's runs (``sidecar_wire``)."""
        if self._wire is None:
            self._wire = SidecarWire(self.port)
        return self._wire



class SidecarProcesses:
    """Starts and destroys this server's sidecars and owns what they share on the host (run uids,
    control groups, the lifeline pipe, the ``/etc`` view). Knows no pools."""

    def __init__(self, settings: Settings, local: LocalExecutorSettings) -> None:
        self.settings = settings
        self.local = local
        self._root_mode = os.geteuid() == 0
        self.sandboxes_dir, warning = sandbox_root(
            settings, local.kcr_local_run_uid_base if self._root_mode else None)
        self.warnings: list[str] = [warning] if warning else []
        # This server's sidecar directories, locked while it or any of its sidecars lives, so the
        # next server can tell a dead server's leftovers from a live one's (sandbox_dirs).
        self.server_dir = sandbox_dirs.claim(self.sandboxes_dir)
        self._live: set[LocalSidecar] = set()
        self._free_uids: list[int] = []
        self._uid_locks: dict[int, int] = {}
        self._next_uid = 0
        # Every sidecar gets the read end; only this process holds the write end (both are
        # close-on-exec here, the read end is passed explicitly), so a sidecar sees EOF and shuts
        # down once this server is gone, also after a SIGKILL (sidecar.server.watch_lifeline).
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._node_path = node_path(local)
        self._package_parent = host.package_parent()
        self.sandboxed = True  # set from decide_sandbox() before the replenishers start
        self.etc_view: Path | None = None  # the sandboxes' /etc, built once (prepare_etc_view)
        # {language: why it cannot run here}, from sidecar.toolchains at start-up (blocking stats).
        self.cgroups = Cgroups(None, "not detected")  # set by open_local_executor
        self.missing: dict[str, str] = {
            code: why for code, why in availability(Toolchain(local.kcr_local_python, self._node_path)).items()
            if why}

    def _alloc_uid(self) -> int | None:
        """A uid no other sandbox uses, in this process or any other on the host (root only).

        Each uid in use is held by an exclusive ``flock`` on ``<tmp>/kcr-trio-uids/<uid>``; the
        kernel drops the lock if this process dies, so ids never leak. Two executors on one host
        (parallel test runs, two API replicas) therefore never share a uid, which matters because
        destroying a sandbox sweeps its uid with ``kill(-1)``.
        """
        if not self._root_mode:
            return None
        if self._free_uids:
            return self._free_uids.pop()
        lock_dir = Path(tempfile.gettempdir()) / "kcr-trio-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        while True:
            uid = self.local.kcr_local_run_uid_base + self._next_uid
            self._next_uid += 1
            fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if host.count_tasks_of_uid(uid):  # someone not using our locks: stay clear
                os.close(fd)
                continue
            self._uid_locks[uid] = fd
            return uid

    def _argv(self, lang: str, fd: int, directory: Path, uid: int | None) -> list[str]:
        s = self.settings
        argv = [
            sys.executable, "-m", "sidecar", "--fd", str(fd), "--language", lang,
            "--working-dir", str(directory / "wd"), "--tmp-root", str(directory / "tmp"), "--announce",
            "--max-execution-time", str(s.max_execution_time),
            "--max-output-size", str(max(self.local.kcr_local_max_output_bytes, 4 * s.kcr_max_output_chars)),
            "--max-memory-mb", str(s.max_memory_mb), "--max-pids", str(s.max_pids),
            "--max-open-files", str(s.max_open_files), "--max-file-size-mb", str(s.max_file_size_mb),
            "--disk-quota-mb", str(max(self.local.kcr_local_disk_quota_mb, 2 * s.max_file_size_mb)),
            "--prewarm", "true" if s.kcr_sidecar_prewarm else "false", "--reset-between-runs", "true",
            "--python-preimports", s.kcr_python_preimports, "--lifeline-fd", str(self._lifeline_r),
            "--compile-timeout", str(s.kcr_compile_timeout),
            # One Node start-up snapshot per server, shared by its js sidecars (same filesystem
            # as their temp roots: runs get a hard link).
            "--node-snapshot-dir", str(self.server_dir.path),
        ]
        if uid is not None:
            argv += ["--run-uid", str(uid), "--run-gid", str(uid), "--run-uid-exclusive", "true"]
        if self._node_path:
            argv += ["--node-path", self._node_path]
        if self.sandboxed:  # the sidecar probes again and refuses to start if bwrap fails
            argv += ["--sandbox", "bwrap", "--sandbox-allow-network",
                     "true" if s.kcr_sandbox_allow_network else "false",
                     "--sandbox-ro-paths", self.local.kcr_local_sandbox_ro_paths,
                     "--sandbox-bwrap", self.local.kcr_local_bwrap]
            if self.etc_view is not None:
                argv += ["--sandbox-etc-view", str(self.etc_view)]
        else:
            argv += ["--sandbox", "none"]
        if self.local.kcr_local_python:
            argv += ["--python", self.local.kcr_local_python]
        groups = self._make_groups(directory)
        if groups:
            argv += ["--cgroup-version", str(self.cgroups.version), "--cgroup-run", groups[0],
                     "--cgroup-compile", groups[1]]
        return argv

    def _group_name(self, directory: Path) -> str:
        return f"{CGROUP_PREFIX}{os.getpid()}/{directory.name}"

    def _make_groups(self, directory: Path) -> tuple[str, str] | None:
        """This slot's control groups (the run's and its compile steps'), as comma-separated dirs."""
        if self.cgroups.version is None:
            return None
        s = self.settings
        name = self._group_name(directory)
        run = self.cgroups.create(f"{name}/run", s.max_memory_mb, s.max_pids + EXTRA_PROCESSES)
        build = self.cgroups.create(f"{name}/compile",
                                    max(s.max_memory_mb, self.local.kcr_local_compile_memory_mb),
                                    max(s.max_pids, 1024) + EXTRA_PROCESSES)
        return ",".join(run.dirs), ",".join(build.dirs)

    async def _start(self, lang: str) -> LocalSidecar:
        """Start one sidecar and wait until it announces itself; raises ``Unavailable``."""
        uid = self._alloc_uid()
        directory = self.server_dir.path / f"{lang}-{secrets.token_hex(8)}"
        directory.mkdir(mode=0o711)
        (directory / "tmp").mkdir(mode=0o711)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sidecar: LocalSidecar | None = None
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            port = sock.getsockname()[1]
            # The sidecar gets a fixed, minimal environment: nothing from the server's.
            env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8",
                   "PYTHONPATH": self._package_parent, "PYTHONDONTWRITEBYTECODE": "1"}
            process = await trio.lowlevel.open_process(
                self._argv(lang, sock.fileno(), directory, uid), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=None, pass_fds=(sock.fileno(), self._lifeline_r, self.server_dir.lock_fd), env=env,
                start_new_session=True,
            )
            sidecar = LocalSidecar(lang, process, port, directory, uid)
            self._live.add(sidecar)
            sock.close()
            line = b""
            with trio.move_on_after(self.local.kcr_local_start_timeout):
                assert process.stdout is not None
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some(4096)
                    if not chunk:
                        break
                    line += chunk
            try:
                announced = json.loads(line)["port"] == port
            except (ValueError, KeyError, TypeError):
                announced = False
            if not announced:
                raise Unavailable(f"The {lang} sidecar did not start (exit code {process.returncode})")
            result, sidecar = sidecar, None
            return result
        except OSError as exc:
            raise Unavailable(f"Cannot start a {lang} sidecar: {exc}") from exc
        finally:
            sock.close()
            if sidecar is not None:  # failed or cancelled half-way: leave nothing behind
                with trio.CancelScope(shield=True):
                    await self._destroy(sidecar)
            elif not any(s.directory == directory for s in self._live):
                shutil.rmtree(directory, ignore_errors=True)
                if self.cgroups.version is not None:
                    self.cgroups.remove(self._group_name(directory))
                if uid is not None:
                    self._free_uids.append(uid)

    async def _destroy(self, sidecar: LocalSidecar) -> None:
        """Kill the sidecar and everything below it, then remove its directory. Shielded, bounded."""
        if sidecar._wire is not None:
            sidecar._wire.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                # returncode is read here, not in the thread: on a process that already exited it
                # closes trio's pidfd, which only works from the Trio thread (it crashed the server).
                alive = sidecar.process.returncode is None
                await trio.to_thread.run_sync(self._kill_sync, sidecar, alive)
                with trio.move_on_after(5):
                    await sidecar.process.wait()
                await trio.to_thread.run_sync(_remove_tree, sidecar.directory)
                if self.cgroups.version is not None:
                    await trio.to_thread.run_sync(self.cgroups.remove, self._group_name(sidecar.directory))
            self._live.discard(sidecar)
            if sidecar.uid is not None and sidecar.process.returncode is not None:
                self._free_uids.append(sidecar.uid)

    @staticmethod
    def _kill_sync(sidecar: LocalSidecar, alive: bool) -> None:
        host.kill_sidecar(sidecar.process.pid, alive, sidecar.uid)

    def prepare_etc_view(self) -> None:
        """Build the curated ``/etc`` every sandbox of this server binds as one mount
        (``sidecar.sandbox.build_etc_view``), once per server: copying it per sidecar cost ~150 ms
        of CPU on every cold start. Views of dead servers are removed first. Blocking."""
        for entry in self.sandboxes_dir.glob("etc-view-*"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()):
                remove_tree(str(entry))
        view = self.sandboxes_dir / f"etc-view-{os.getpid()}"
        try:
            build_etc_view(str(view), etc_entries(self.settings.kcr_sandbox_allow_network),
                           split_paths(self.local.kcr_local_sandbox_ro_paths))
        except OSError as exc:  # the sidecars then build their own
            log.warning("could not prepare the sandboxes' /etc view: %s", exc)
            remove_tree(str(view))
            return
        self.etc_view = view

    def sweep_dead_servers(self) -> None:
        """Remove the sidecar directories of servers that died without cleaning up (SIGKILL):
        only those whose lock nobody holds any more (``sandbox_dirs``). Blocking."""
        sandbox_dirs.sweep_dead(self.sandboxes_dir)

    async def _close_processes(self) -> None:
        """Kill every sidecar ever started (shielded and bounded each), then give back the
        host-wide resources: control groups, uid locks, the lifeline, the ``/etc`` view."""
        live = list(self._live)
        async with trio.open_nursery() as nursery:
            for sidecar in live:
                nursery.start_soon(self._destroy, sidecar)
        if self.cgroups.version is not None:
            self.cgroups.remove(f"{CGROUP_PREFIX}{os.getpid()}")
        for fd in self._uid_locks.values():
            os.close(fd)
        self._uid_locks.clear()
        lifeline, self._lifeline_w, self._lifeline_r = (self._lifeline_w, self._lifeline_r), -1, -1
        for fd in lifeline:
            if fd >= 0:
                os.close(fd)
        if self.etc_view is not None:
            await trio.to_thread.run_sync(remove_tree, str(self.etc_view))
            self.etc_view = None
        await trio.to_thread.run_sync(_remove_tree, self.server_dir.path)
        self.server_dir.close()
        self._free_uids.clear()


def _remove_tree(path: Path) -> None:
    if path.exists():
        remove_tree(str(path))
