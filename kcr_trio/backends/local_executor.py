"""``LocalExecutor``: warm pools of local sidecar processes, each serving many runs one at a time.

The embedded default executor. Each sandbox is a ``python -m sidecar`` process with its own working
directory under ``<KCR_DATA_DIR>/sandboxes/`` and (when we run as root) its own uid, so concurrent
sandboxes cannot signal or read each other and ``RLIMIT_NPROC`` counts only their own processes.

Start-up cannot race: the executor binds the listening socket itself and passes the fd to the child
(``--fd``); a request sent before the child runs simply waits in the kernel's accept backlog. The
child prints one JSON line once it serves and its interpreter is pre-warmed.

Why sidecars are reused: starting one costs a Python import of the sidecar (~0.4 s of CPU here),
which capped the embedded default at ~5 exec/s. What makes a run's sandbox fresh is not the sidecar
process (trusted code, never reachable by user code) but what the sidecar creates per run: new
bubblewrap namespaces and mounts, a new interpreter, a new private temp dir. Between two runs the
sidecar's ``POST /reset`` kills every process of the run (tree, then the uid sweep), replaces the
working directory with a new empty one and only then starts the next interpreter, so the next run
starts exactly as it would in a new sidecar.

Lifecycle and cancellation:

* ``open_local_executor(settings)`` owns a nursery with one replenisher task per language whose
  pool target (``POD_POOL_<LANG>``) is above zero, and every release task. Leaving it (also by
  cancellation) stops the replenishers, lets the (shielded, bounded) releases end and then, shielded
  and bounded, kills every sidecar it ever started.
* ``sandbox(lang, wait=…)`` waits at most ``wait`` seconds for one of
  ``MAX_CONCURRENT_EXECUTIONS`` slots (else ``errors.Busy``) and takes a warm sidecar or starts one
  cold. Leaving it (also by cancellation) returns at once: the release runs in the executor's
  nursery, so the answer never waits for a teardown. The release resets the sidecar and returns it
  to its pool, or destroys it (SIGSTOP, kill its whole process tree, SIGKILL, sweep its uid, remove
  its directory); the slot counts as busy until the release ends.
"""

from __future__ import annotations

import collections
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.config import Settings
from kcr_trio.core.errors import Busy, Unavailable, unsupported_language
from kcr_trio.core.languages import COMPILED, LANGUAGES
from sidecar import host
from sidecar.host import (
    CGROUP_PREFIX,
    EXTRA_PROCESSES,
    Cgroups,
    Toolchain,
    availability,
    build_etc_view,
    etc_entries,
    reachable_by,
    remove_tree,
    split_paths,
)

from .sidecar_client import SidecarSandbox

log = logging.getLogger("kcr_trio.local_executor")
# The release starts this long after the sandbox was handed back: the answer, already on its way
# in the same event loop, goes out first instead of sharing the CPU with the release's HTTP call.
RELEASE_DELAY = 0.005
# How long a run waits for a sidecar of its language (being reset or started) before it starts
# one itself.
RETURN_WAIT = 5.0


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


def _sandbox_root(settings: Settings, uid_probe: int | None) -> tuple[Path, str | None]:
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


def _node_path(local: LocalExecutorSettings) -> str | None:
    if local.kcr_local_node_path:
        return local.kcr_local_node_path
    if os.environ.get("NODE_PATH"):
        return os.environ["NODE_PATH"]
    paths = ["/usr/local/lib/node_modules", "/usr/lib/node_modules"]
    checkout = Path(__file__).resolve().parents[2] / "tests" / "node" / "node_modules"
    if (checkout / "typescript").is_dir():  # a source checkout with the test clients installed
        paths.append(str(checkout))
    return ":".join(paths)


@dataclass(eq=False)
class _Sidecar:
    language: str
    process: trio.Process
    port: int
    directory: Path
    uid: int | None
    runs: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(eq=False)
class _Waiter:
    """A run queued for the next sidecar of its language to come back from a reset."""

    event: trio.Event = field(default_factory=trio.Event)
    sidecar: _Sidecar | None = None


class LocalExecutor:
    ptc_capable = True  # Executor: every sandbox is a sidecar, which carries the PTC channel

    def __init__(self, settings: Settings, local: LocalExecutorSettings, nursery: trio.Nursery,
                 http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.local = local
        self._nursery = nursery
        self._http = http
        self.capacity = settings.max_concurrent_executions
        self._slots = trio.Semaphore(self.capacity)
        self.in_use = 0
        self._root_mode = os.geteuid() == 0
        self.sandboxes_dir, warning = _sandbox_root(
            settings, local.kcr_local_run_uid_base if self._root_mode else None)
        self.warnings: list[str] = [warning] if warning else []
        self._targets = {code: settings.pool_size(code) for code in LANGUAGES}
        self._pools: dict[str, collections.deque[_Sidecar]] = {c: collections.deque() for c in LANGUAGES}
        self._wake: dict[str, trio.Event] = {c: trio.Event() for c in LANGUAGES}
        # Releases in flight per language, and the runs queued for the sidecars they return (_take).
        self._releasing: dict[str, int] = {c: 0 for c in LANGUAGES}
        self._growing: dict[str, int] = {c: 0 for c in LANGUAGES}  # background starts (_grow)
        self._waiters: dict[str, collections.deque[_Waiter]] = {c: collections.deque() for c in LANGUAGES}
        self._filled: set[str] = set()
        self._live: set[_Sidecar] = set()
        self._free_uids: list[int] = []
        self._uid_locks: dict[int, int] = {}
        self._next_uid = 0
        self._closing = False
        # Every sidecar gets the read end; only this process holds the write end (both are
        # close-on-exec here, the read end is passed explicitly), so a sidecar sees EOF and shuts
        # down once this server is gone, also after a SIGKILL (sidecar.server.watch_lifeline).
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._node_path = _node_path(local)
        self._package_parent = host.package_parent()
        self.sandboxed = True  # set from decide_sandbox() before the replenishers start
        self.etc_view: Path | None = None  # the sandboxes' /etc, built once (prepare_etc_view)
        # {language: why it cannot run here}, from sidecar.toolchains at start-up (blocking stats).
        self.cgroups = Cgroups(None, "not detected")  # set by open_local_executor
        self.missing: dict[str, str] = {
            code: why for code, why in availability(Toolchain(local.kcr_local_python, self._node_path)).items()
            if why}

    # --- Executor protocol ----------------------------------------------------------------
    @asynccontextmanager
    async def sandbox(self, language: str, *, wait: float) -> AsyncIterator[SidecarSandbox]:
        lang = language.strip().lower()
        if lang not in LANGUAGES:
            raise unsupported_language(language)
        if self._closing:
            raise Unavailable("The executor is shutting down")
        missing = self.missing.get(lang)
        if missing:
            raise Unavailable(f"Language {lang!r} is not available on this server: {missing}")
        with trio.move_on_after(wait) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise Busy(f"All {self.capacity} execution slots are busy; try again shortly",
                       retry_after=self.settings.kcr_busy_retry_after)
        sidecar: _Sidecar | None = None
        self.in_use += 1
        try:
            sidecar = await self._take(lang, wait)
            self._wake[lang].set()
            if sidecar is None:
                sidecar = await self._start(lang)
        except BaseException:
            with trio.CancelScope(shield=True):
                if sidecar is not None:
                    await self._destroy(sidecar)
                self._free_slot()
            raise
        try:
            # The sidecar refuses timeouts above MAX_EXECUTION_TIME (422); callers never ask for more,
            # but a clamp keeps a rounding slip from becoming an error.
            yield SidecarSandbox(sidecar.url, client=self._http,
                                 timeout_cap=float(self.settings.max_execution_time),
                                 compile_timeout=self.settings.kcr_compile_timeout if lang in COMPILED else 0.0)
        finally:
            self._hand_back(sidecar)

    async def _take(self, lang: str, wait: float) -> _Sidecar | None:
        """A warm sidecar of ``lang`` from its pool, or None (then the caller starts one cold).

        On a miss the pool grows as before (one more sidecar, up to ``max(target, capacity)``),
        but in the background (``_grow``), and the run takes whichever sidecar of ``lang`` is
        ready first: one coming back from its reset (milliseconds) or the new one. Before, a miss
        always waited for its own cold start (~0.4 s of CPU): at c=1 back to back with a pool of
        one, the second request did (the bash p99 of ~0.5 s). A sidecar that comes back goes to
        the first waiter directly (``_give``): a waiter is never overtaken by a later run."""
        pool = self._pools[lang]
        while pool:
            candidate = pool.popleft()
            if candidate.process.returncode is None:
                return candidate
            await self._destroy(candidate)
        self._grow(lang)
        waiters = self._waiters[lang]
        if self._coming(lang) <= len(waiters):
            return None
        waiter = _Waiter()
        waiters.append(waiter)
        try:
            with trio.move_on_after(min(wait, RETURN_WAIT)):
                await waiter.event.wait()
        except BaseException:
            if waiter.sidecar is not None:  # handed over just as we were cancelled: keep it warm
                pool.appendleft(waiter.sidecar)
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
        return waiter.sidecar

    def _coming(self, lang: str) -> int:
        """Sidecars of ``lang`` that will soon be free: being reset or being started for a miss."""
        return self._releasing[lang] + self._growing[lang]

    def _excess_waiters(self, lang: str) -> None:
        """Waiters beyond what is coming start their own sidecar now instead of waiting in vain."""
        waiters = self._waiters[lang]
        while len(waiters) > self._coming(lang):
            waiters.pop().event.set()

    def _grow(self, lang: str) -> None:
        """Start one more sidecar of ``lang`` in the background after a miss, unless the language
        already has ``max(target, capacity)`` (the most its pool keeps): the pool follows demand."""
        live = sum(1 for s in self._live if s.language == lang) + self._growing[lang]
        if self._closing or live >= max(self._targets[lang], self.capacity):
            return
        self._growing[lang] += 1
        try:
            self._nursery.start_soon(self._start_for_pool, lang)
        except RuntimeError:  # the nursery is closed (shutdown)
            self._growing[lang] -= 1

    async def _start_for_pool(self, lang: str) -> None:
        """``_grow``'s start: the new sidecar goes to a waiting run or the pool; never raises."""
        sidecar: _Sidecar | None = None
        try:
            sidecar = await self._start(lang)
            if not self._closing:
                self._give(sidecar)  # before the count drops: the waiter it is for is still queued
                sidecar = None
        except Unavailable as exc:
            log.warning("could not start a %s sidecar: %s", lang, exc.message)
        finally:
            self._growing[lang] -= 1
            self._excess_waiters(lang)
        if sidecar is not None:  # started while shutting down
            await self._destroy(sidecar)

    def _give(self, sidecar: _Sidecar) -> None:
        """A reset sidecar goes to the first run waiting for one, else back to its pool."""
        waiters = self._waiters[sidecar.language]
        if waiters:
            waiter = waiters.popleft()
            waiter.sidecar = sidecar
            waiter.event.set()
        else:
            self._pools[sidecar.language].append(sidecar)

    def _hand_back(self, sidecar: _Sidecar) -> None:
        """Leave the release to the executor's nursery: the caller answers now, the slot stays
        counted busy until ``_release`` ends (capacity is never overstated)."""
        try:
            self._nursery.start_soon(self._release, sidecar)
        except RuntimeError:  # the nursery is closed (shutdown): aclose() kills every sidecar
            self._free_slot()

    def _free_slot(self) -> None:
        self.in_use -= 1
        self._slots.release()

    async def _release(self, sidecar: _Sidecar) -> None:
        """Reset the sidecar for its next run, or destroy it; then free the slot. Shielded (a
        shutdown must not leave a used sandbox in a pool) and bounded; never raises."""
        lang = sidecar.language
        self._releasing[lang] += 1
        try:
            with trio.CancelScope(shield=True):
                await trio.sleep(RELEASE_DELAY)
                if await self._reset(sidecar):
                    sidecar.runs += 1
                    self._give(sidecar)
                else:
                    await self._destroy(sidecar)
        finally:
            self._releasing[lang] -= 1
            self._excess_waiters(lang)
            self._free_slot()

    def _keep(self, sidecar: _Sidecar) -> bool:
        """Whether a used sidecar goes back to its pool (after a reset) rather than away.

        Each language keeps at most ``max(target, capacity)`` idle sidecars, and all languages
        together at most ``capacity`` beyond their targets, so a burst of rare languages cannot
        pin memory; ``kcr_local_max_runs_per_sidecar`` bounds any slow leak in a sidecar. When
        that shared allowance is used up by idle sidecars of other languages, the one idle longest
        in the language with the most beyond its target makes room (``_evict_for``): the
        allowance follows demand. Before, after load moved from one language to another, every
        run of the new one destroyed its sidecar and the next cold-started one (~0.4 s of CPU)."""
        lang = sidecar.language
        if self._closing or sidecar.process.returncode is not None:
            return False
        if sidecar.runs + 1 >= self.local.kcr_local_max_runs_per_sidecar:
            return False
        pool, target = self._pools[lang], self._targets[lang]
        if len(pool) >= max(target, self.capacity):
            return False
        extra = sum(max(0, len(self._pools[c]) - self._targets[c]) for c in LANGUAGES)
        return len(pool) < target or extra < self.capacity or self._evict_for(lang)

    def _evict_for(self, lang: str) -> bool:
        """Destroy (in the background) the longest-idle sidecar of the language with the most
        idle sidecars beyond its target, other than ``lang``; False if there is none."""
        over = [(len(self._pools[c]) - self._targets[c], c) for c in LANGUAGES if c != lang]
        excess, victim_lang = max(over)
        if excess <= 0:
            return False
        victim = self._pools[victim_lang].popleft()
        try:
            self._nursery.start_soon(self._destroy, victim)
        except RuntimeError:  # the nursery is closed (shutdown): aclose() kills every sidecar
            return False
        return True

    async def _reset(self, sidecar: _Sidecar) -> bool:
        """``POST /reset``: the sidecar kills everything of the last run, replaces its working
        directory and starts a fresh interpreter (``sidecar.runner.Runner.reset``)."""
        if not self._keep(sidecar):
            return False
        with trio.move_on_after(self.local.kcr_local_reset_timeout):
            try:
                resp = await self._http.post(f"{sidecar.url}/reset")
            except httpx.HTTPError as exc:
                log.warning("sidecar reset failed: %s", exc)
                return False
            if resp.status_code == 200:
                return not self._closing
            log.warning("sidecar reset answered %s", resp.status_code)
        return False

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        pools = {code: {"warm": len(self._pools[code]), "target": self._targets[code]}
                 for code in LANGUAGES}
        wanted = {c for c, t in self._targets.items() if t > 0}
        return {
            "ready": not self._closing and wanted <= self._filled,
            "pools": pools,
            "in_use": self.in_use,
            "capacity": self.capacity,
            "sandbox": "bwrap" if self.sandboxed else "none",
            "memory_bound": self.cgroups.status(),
            "languages": {code: ({"available": False, "reason": self.missing[code]} if code in self.missing
                                 else {"available": True}) for code in LANGUAGES},
        }

    # --- pools ----------------------------------------------------------------------------
    def start_replenishers(self) -> None:
        for code, target in self._targets.items():
            if code in self.missing:
                if target > 0:
                    log.warning("language %s is not available (%s); its pool stays empty", code,
                                self.missing[code])
                self._filled.add(code)
            elif target > 0:
                self._nursery.start_soon(self._replenish, code, target)

    async def _replenish(self, lang: str, target: int) -> None:
        """Keep ``target`` warm sidecars of ``lang``; never raises (it lives in the owner's nursery)."""
        pool = self._pools[lang]
        failures = 0
        while True:
            while len(pool) < target and not self._closing:
                try:
                    sidecar = await self._start(lang)
                except Unavailable as exc:
                    failures += 1
                    self._filled.add(lang)  # readiness must not hang on a broken toolchain
                    log.warning("could not start a %s sidecar: %s", lang, exc.message)
                    await trio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                    continue
                failures = 0
                self._give(sidecar)  # a run waiting for one gets it, else the pool
            self._filled.add(lang)
            self._wake[lang] = trio.Event()
            await self._wake[lang].wait()

    # --- one sidecar ----------------------------------------------------------------------
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

    async def _start(self, lang: str) -> _Sidecar:
        """Start one sidecar and wait until it announces itself; raises ``Unavailable``."""
        uid = self._alloc_uid()
        directory = self.sandboxes_dir / f"{lang}-{secrets.token_hex(8)}"
        directory.mkdir(mode=0o711)
        (directory / "tmp").mkdir(mode=0o711)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sidecar: _Sidecar | None = None
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            port = sock.getsockname()[1]
            # The sidecar gets a fixed, minimal environment: nothing from the server's.
            env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8",
                   "PYTHONPATH": self._package_parent, "PYTHONDONTWRITEBYTECODE": "1"}
            process = await trio.lowlevel.open_process(
                self._argv(lang, sock.fileno(), directory, uid), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=None, pass_fds=(sock.fileno(), self._lifeline_r), env=env,
                start_new_session=True,
            )
            sidecar = _Sidecar(lang, process, port, directory, uid)
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

    async def _destroy(self, sidecar: _Sidecar) -> None:
        """Kill the sidecar and everything below it, then remove its directory. Shielded, bounded."""
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
    def _kill_sync(sidecar: _Sidecar, alive: bool) -> None:
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

    async def aclose(self) -> None:
        self._closing = True
        for pool in self._pools.values():
            pool.clear()
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
        self._free_uids.clear()


def _remove_tree(path: Path) -> None:
    if path.exists():
        remove_tree(str(path))


@asynccontextmanager
async def open_local_executor(settings: Settings) -> AsyncIterator[LocalExecutor]:
    """The local executor with its replenishers; on exit every sidecar it started is killed."""
    local = LocalExecutorSettings()
    try:
        sandboxed, sandbox_warning = await trio.to_thread.run_sync(decide_sandbox, settings, local)
    except SandboxUnavailable as exc:
        log.critical("%s", exc)
        raise
    if sandbox_warning:
        log.warning("%s", sandbox_warning)
    groups = await trio.to_thread.run_sync(partial(host.detect_cgroups, disabled=not local.kcr_local_cgroups))
    if groups.version is None:
        log.warning("no per-run memory bound: %s", groups.detail)
    else:
        await trio.to_thread.run_sync(host.sweep_stale_cgroups, groups)
    limits = httpx.Limits(max_connections=max(64, 4 * settings.max_concurrent_executions),
                          max_keepalive_connections=32, keepalive_expiry=5.0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, connect=5.0),
                                 follow_redirects=False, trust_env=False) as http:
        executor: LocalExecutor | None = None
        try:
            async with trio.open_nursery() as nursery:
                executor = LocalExecutor(settings, local, nursery, http)
                executor.sandboxed = sandboxed
                executor.cgroups = groups
                if groups.version is None:
                    executor.warnings.append(f"no per-run memory bound: {groups.detail}")
                if sandbox_warning:
                    executor.warnings.append(sandbox_warning)
                if sandboxed:
                    await trio.to_thread.run_sync(executor.prepare_etc_view)
                executor.start_replenishers()
                try:
                    yield executor
                finally:
                    executor._closing = True
                    nursery.cancel_scope.cancel()
        finally:
            if executor is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(20):
                    await executor.aclose()
