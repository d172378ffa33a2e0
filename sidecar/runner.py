"""Running one program: steps, output capture, limits, timeout, and killing everything afterwards.

Cancellation semantics: ``Runner.execute`` may be cancelled at any await (the HTTP layer cancels it
when the caller's connection goes away). Whatever happens, its ``finally`` kills every process the
run started (``proctree.kill_tree``: SIGTERM, a 20 ms grace, then SIGKILL sweeps over ``/proc``),
reaps them, queues the run's private temp dir for removal (done by ``replenish`` once the answer is
sent) and logs one JSON line if the run did not finish normally. The kill runs shielded, in a
worker thread when there is anything to kill, bounded by ``proctree``'s own deadline.

Pre-warmed interpreters have exactly one waiter, their watcher task (Trio allows one per process):
a run waits for ``Warm.finished`` (the program's reported status, or the exit) instead.

Output: each stream keeps at most ``max_output_size`` bytes and discards (but keeps draining) the
rest, so memory stays flat; a program whose stream exceeds ``output_kill_factor`` times the cap is
stopped (``killed: "output"``). Disk: a watcher sums working dir + private temp dir every 100 ms and
stops the program when it has added more than ``disk_quota_mb`` or ``max_files`` entries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from . import files, leftovers, node_snapshot, proctree, program_file
from .cgroups import Group
from .config import Config
from .languages import (
    SOURCE_FILES,
    Context,
    LanguageSpec,
    Step,
    Toolchain,
    node_flags,
    prewarm_step,
    with_args,
)
from .limits import MB, Identity, Limits, SpawnSpec, base_env, cpu_limit_for, spawn_user
from .prewarm import Warm, make_private_tmp, remove_tree
from .sandbox import EXTRA_PROCESSES, Sandbox, exit_signal, not_exiting, payload_pid

TRUNCATED = "\n[Output truncated - size limit exceeded]"
SETTLE_GRACE = 0.02  # seconds an answered run's interpreter gets to exit by itself (Runner.settle)
HOUSEKEEPING_DELAY = 0.005  # seconds between an answer and the work it left (see Runner.replenish)
_MEMORY_PATTERNS = re.compile(
    r"MemoryError|out of memory|Cannot allocate memory|std::bad_alloc|heap out of memory|"
    r"OutOfMemoryError|failed to reserve|cannot allocate vector|Allowed memory size|memory allocation failed",
    re.IGNORECASE,
)
_PIDS_PATTERNS = re.compile(
    r"fork: (retry: )?Resource temporarily unavailable|BlockingIOError: \[Errno 11\]|"
    r"unable to create (new )?native thread|Cannot fork|EAGAIN.*(fork|spawn|clone)",
    re.IGNORECASE,
)


def log(event: str, **fields: Any) -> None:
    """One JSON line on stderr (the sidecar's only log channel)."""
    # ISO 8601 UTC, the same shape the API's logs carry under ``ts`` (one format across the fleet).
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    line = {"ts": ts, "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(line, default=str) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Conflict(Exception):
    """An execution is already running."""


class Capture:
    """A capped byte buffer for one output stream."""

    def __init__(self, cap: int, kill_at: int) -> None:
        self.cap = cap
        self.kill_at = kill_at
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes | bytearray) -> bool:
        """Keep what fits; return True once the stream has exceeded the kill threshold."""
        self.total += len(data)
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        return self.total > self.kill_at

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        out = self.buf.decode("utf-8", "replace")
        return out + TRUNCATED if self.truncated else out


@dataclass(slots=True)
class RunState:
    out: Capture
    err: Capture
    tmp: str
    reason: str | None = None  # timeout | compile_timeout | output | disk | cpu | file_size | memory | oom | pids
    step_scope: trio.CancelScope | None = None
    pids: set[int] = field(default_factory=set)
    closed: bool = False  # the steps are over: watchers can no longer change the outcome

    def stop(self, reason: str) -> None:
        if self.closed:
            return
        if self.reason is None:
            self.reason = reason
        if self.step_scope is not None:
            self.step_scope.cancel()


def _fmt_seconds(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


class Runner:
    """Runs one execution at a time for one language in one working directory."""

    def __init__(self, cfg: Config, spec: LanguageSpec, identity: Identity) -> None:
        self.cfg = cfg
        self.spec = spec
        self.identity = identity
        self.tools = Toolchain(cfg.python, cfg.node_path)
        self.busy = False
        self.tracked: set[int] = set()  # pids Trio waits for; reap_orphans must not touch them
        self.warm: Warm | None = None
        self._warm_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.runs = 0
        self._killed: set[int] = set()  # pids killed during the current execution (for the log)
        self._tree_clean = False  # the last sweep found nothing left of the run
        self._trash: list[str] = []  # private temp dirs of finished runs, removed in the background
        # Housekeeping after a run (next interpreter, trash) waits HOUSEKEEPING_DELAY unless a
        # run wants the interpreter sooner: ``_hurry`` cuts the wait, ``_housekeeping`` is set
        # once it is done.
        self._hurry: trio.Event | None = None
        self._housekeeping: trio.Event | None = None
        self.warm_broken = False
        # A run that answered on its interpreter's own "done" report before seeing it exit; every
        # request after the answer, and the next interpreter, wait for ``settle`` first.
        self._unsettled: Warm | None = None
        self._settle_lock = trio.Lock()
        self._node_blob: str | None = None  # pre-warmed js: the start-up snapshot (node_snapshot.py)
        self.sandbox: Sandbox | None = None  # set by the server when user code runs in bubblewrap
        # ``reset_between_runs``: set after every run, cleared by ``reset``. While set, no
        # interpreter is started (it would share the uid and the directory with what the last run
        # may have left: the sweep must come first).
        self.awaiting_reset = False
        # Control groups bounding the whole run (cgroups.py), made by the executor; None: none.
        self.groups: dict[bool, Group] = {}
        if cfg.cgroup_version in ("v1", "v2"):
            for is_compile, dirs in ((False, cfg.cgroup_run), (True, cfg.cgroup_compile)):
                if dirs:
                    self.groups[is_compile] = Group(cfg.cgroup_version, dirs.split(","))

    # --- pre-warm --------------------------------------------------------------------------
    @property
    def prewarm_enabled(self) -> bool:
        return self.cfg.prewarm and self.spec.prewarm is not None

    @property
    def ready(self) -> bool:
        if not os.path.isdir(self.cfg.working_dir):
            return False
        if not self.prewarm_enabled:
            return True
        if self.warm_broken:  # pre-warm cannot work here (e.g. a missing module): serve cold
            return True
        return self.warm is not None and self.warm.ready.is_set() and not self.warm.failed

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work (pre-warm spawns) for the sidecar's lifetime."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.prewarm_enabled and self.spec.prewarm == "js" and self.cfg.node_snapshot_dir:
                    self._node_blob = await trio.to_thread.run_sync(
                        node_snapshot.ensure, self.cfg.node_snapshot_dir, self.tools("node"),
                        node_flags(self.cfg.max_memory_mb))
                if self.prewarm_enabled:
                    await self._spawn_warm()
                task_status.started()
                while True:  # adopted orphans become our zombies: reap them even between runs
                    await trio.sleep(1)
                    proctree.reap_orphans(self.tracked)
        finally:
            with trio.CancelScope(shield=True):
                await self._discard_warm()
                await trio.to_thread.run_sync(self._kill_all)
                for path in self._trash:
                    await trio.to_thread.run_sync(remove_tree, path)

    def _context(self, tmp: str) -> Context:
        return Context(tmp=tmp, memory_mb=self.cfg.max_memory_mb, tools=self.tools)

    def _warm_context(self, tmp: str) -> Context:
        """The context of a pre-warmed interpreter: with the Node snapshot, when there is one,
        as a hard link in the run's private temp dir (bound into the sandbox; root-owned and
        read-only, so a run can at most unlink its own link)."""
        c = self._context(tmp)
        if self._node_blob:
            link = os.path.join(tmp, "node.blob")
            try:
                os.link(self._node_blob, link)
            except OSError:  # another filesystem, or the blob is gone: start without it
                return c
            c = dataclasses.replace(c, node_snapshot=link)
        return c

    def _limits(self, timeout: float, step: Step) -> Limits:
        nproc = self.cfg.max_pids
        if step.compile:
            nproc = max(nproc, 1024)
        if self.sandbox is not None:  # bwrap's monitor and PID-namespace reaper count too
            nproc += EXTRA_PROCESSES
        if not (self.identity.switching and self.identity.exclusive):
            # RLIMIT_NPROC counts every task of the real uid: leave room for what already runs.
            uid = self.identity.uid if self.identity.switching else os.getuid()
            nproc += proctree.count_tasks_of_uid(uid)  # type: ignore[arg-type]
        mem = step.address_space_mb or self.cfg.max_memory_mb
        cpu, fsize = cpu_limit_for(timeout), self.cfg.max_file_size_mb
        if step.compile:
            # Compile steps are trusted tools with limits of their own: a linker writes files far
            # larger than MAX_FILE_SIZE_MB allows the program (rustc's ld died of SIGXFSZ at the
            # default 10 MB), and threaded compilers burn CPU seconds faster than wall seconds.
            # The wall clock (the run's timeout) and the disk quota still bind them.
            cpu *= max(1, self.cfg.compile_cpu_factor)
            fsize = max(fsize, self.cfg.compile_file_size_mb)
        return Limits(
            cpu_seconds=cpu,
            address_space_mb=mem,
            nproc=nproc,
            file_size_mb=fsize,
            open_files=self.cfg.max_open_files,
        )

    def _spec_for(self, step: Step, tmp: str, timeout: float, **extra: Any) -> SpawnSpec:
        env = base_env(f"{tmp}/home", f"{tmp}/tmp", step.env)
        group = self.groups.get(step.compile)
        return SpawnSpec(step.argv, self.cfg.working_dir, env, self._limits(timeout, step),
                         self.identity, sandbox=self.sandbox, tmp=tmp,
                         cgroup_procs=group.procs_files if group else None, **extra)

    def _oom_kills(self, kinds: set[bool]) -> int:
        """OOM kills so far in the groups of the steps of ``kinds`` (compile or not): a
        pre-warmed run never has a process in the compile group, so it reads one file, not two."""
        return sum(g.oom_kills() for k, g in self.groups.items() if k in kinds)

    async def _spawn_warm(self) -> None:
        await self.settle()  # never next to what is left of the last run
        async with self._warm_lock:
            if self.warm is not None:
                return
            tmp = make_private_tmp(self.cfg.tmp_root, self.identity)
            staged = program_file.stage(tmp, self.identity)  # the run only renames it (program_file)
            parent, child = Warm.pair()
            step = prewarm_step(self.spec, self._warm_context(tmp), self.cfg.python_preimports, child.fileno())
            assert step is not None
            try:
                spec = self._spec_for(step, tmp, self.cfg.max_execution_time, pass_fd=child.fileno())
                proc = await spawn_user(spec)
            except OSError as exc:
                parent.close()
                remove_tree(tmp)
                log("prewarm_failed", language=self.spec.code, error=str(exc))
                self.warm_broken = True
                return
            finally:
                child.close()
            self.tracked.add(proc.pid)
            warm = Warm(proc, trio.socket.from_stdlib_socket(parent), tmp)
            warm.staged = staged
            self.warm = warm
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_warm, warm)

    async def _watch_warm(self, warm: Warm) -> None:
        try:
            with warm.idle_scope:
                await warm.wait_handshake()
                if warm.failed:
                    if self.warm is warm:
                        # The interpreter died before it was ready (e.g. a bad pre-import
                        # crashed it): report it and serve cold until the next run retries.
                        self.warm_broken = True
                        err = b""
                        with trio.move_on_after(1):
                            err = await warm.process.stderr.receive_some(4096)  # type: ignore[union-attr]
                        log("prewarm_failed", language=self.spec.code, stderr=err.decode("utf-8", "replace"))
                        await self._discard_warm(watcher=True)
                    return
                self.warm_broken = False
                self._measure_idle(warm)
                async with trio.open_nursery() as report:
                    report.start_soon(warm.take_report)
                    await warm.process.wait()  # the only task that waits for this process
                    report.cancel_scope.cancel()
                warm.exited.set()
                warm.finished.set()
                if self.warm is warm and not warm.used:  # killed while idle: replace it
                    log("prewarm_died", language=self.spec.code, returncode=warm.process.returncode)
                    await self._discard_warm(watcher=True)
                    self.replenish()
        finally:
            warm.idle_done.set()

    def _measure_idle(self, warm: Warm) -> None:
        """While the interpreter waits, find the process its rlimits apply to (in a sandbox the
        interpreter below bwrap's two) and the CPU time its start-up used: a run then only has to
        set the limit (``_run_step``)."""
        try:
            warm.limit_pid = payload_pid(warm.process.pid) if self.sandbox is not None else warm.process.pid
            warm.cpu_used = _cpu_seconds(warm.limit_pid)
            if self.sandbox is not None and warm.limit_pid != warm.process.pid:
                warm.wrapper_pids = leftovers.chain(warm.process.pid, warm.limit_pid)
        except (OSError, ValueError, IndexError):
            warm.limit_pid = None

    async def _discard_warm(self, watcher: bool = False) -> None:
        warm, self.warm = self.warm, None
        if warm is None:
            return
        with trio.CancelScope(shield=True):
            if not watcher:
                await warm.stop_watching()
            try:
                os.killpg(warm.process.pid, signal.SIGKILL)
            except OSError:
                pass
            with trio.move_on_after(2):
                await warm.process.wait()
            self.tracked.discard(warm.process.pid)
            warm.close()
            await trio.to_thread.run_sync(remove_tree, warm.tmp)

    async def settle(self) -> None:
        """Make sure the last run's interpreter is gone when that run answered on the
        interpreter's own "done" report without seeing it exit (``_run_step``).

        Awaited before anything else touches the sidecar after an answer (every request but the
        probes, the next interpreter) and started in the background right after the answer
        (``replenish``). Usually the interpreter has exited by then (its exit is event-driven:
        the watcher's wait); otherwise the same check as before an early answer applies (poll
        until it is seen exiting, then kill what is left, and wait for the exit). A program that
        forged the report and runs on is stopped here, before the next request can see its files
        or the next run its uid.
        """
        if self._unsettled is None and not self._settle_lock.locked():
            return
        async with self._settle_lock:
            warm, self._unsettled = self._unsettled, None
            if warm is None:
                return
            with trio.CancelScope(shield=True):
                warm.close()  # the bash bootstrap waits (2 ms at most) for this before it exits
                with trio.move_on_after(SETTLE_GRACE):
                    await warm.exited.wait()
                if not warm.exited.is_set():
                    await self._kill_leftovers(settle=True, winding_down=frozenset(warm.wrapper_pids))
                    with trio.move_on_after(2):  # as a run's own clean-up waits (``_run_step``)
                        await warm.exited.wait()

    def replenish(self) -> None:
        """Start the next pre-warmed interpreter and remove finished runs' temp dirs, in the
        background, ``HOUSEKEEPING_DELAY`` after the answer went out.

        Why wait: the fork, the interpreter's start-up (~10 ms of CPU) and the deletion (a thread
        holding the GIL) would compete for the CPU with the caller reading our answer; on a small
        node that showed as a quarter of a millisecond on every request. A run that arrives
        during the wait does not go cold: ``_take_warm`` cuts the wait short and waits for the
        spawn, as it would for any interpreter still starting."""
        if self._unsettled is not None and self._nursery is not None:
            self._nursery.start_soon(self.settle)
        if self._nursery is None or self.busy or self._housekeeping is not None:
            return
        if not self._trash and not self._wants_warm:
            return
        self._hurry, self._housekeeping = trio.Event(), trio.Event()
        self._nursery.start_soon(self._keep_house, self._hurry, self._housekeeping)

    async def _keep_house(self, hurry: trio.Event, done: trio.Event) -> None:
        try:
            with trio.move_on_after(HOUSEKEEPING_DELAY):
                await hurry.wait()
            if self._wants_warm:
                await self._spawn_warm()
        finally:
            self._hurry = self._housekeeping = None
            done.set()
        trash, self._trash = self._trash, []
        for path in trash:
            await trio.to_thread.run_sync(remove_tree, path)

    @property
    def _wants_warm(self) -> bool:
        return self.prewarm_enabled and self.warm is None and not self.awaiting_reset

    async def reset(self) -> None:
        """Make this sidecar as good as a new one for the next run (``reset_between_runs``).

        In order: finish the housekeeping of the last run, kill every process below the sidecar
        and (with an exclusive uid) every process of the run uid, replace the working directory
        with a fresh, empty one (new inode: no file, ACL or mode a run set survives), remove the
        finished runs' temp dirs, and only then start the next pre-warmed interpreter (in the
        background, right after the answer). A new
        sidecar process would give the next run nothing more: its own interpreter, directory,
        bubblewrap namespaces and temp dir are all fresh per run already.
        Raises ``Conflict`` while a run is in progress.
        """
        if self.busy:
            raise Conflict("An execution is running in this sidecar")
        self.busy = True
        try:
            await self.settle()
            if self._housekeeping is not None:
                self._hurry.set()  # type: ignore[union-attr]
                await self._housekeeping.wait()
            await self._discard_warm()
            await trio.to_thread.run_sync(self._fresh_start)
        finally:
            self.busy = False
        self.awaiting_reset = False
        # The next interpreter is started now, before this answer: the run's own answer went out
        # before the reset was asked for, so nothing competes with it, and the interpreter is up
        # sooner for the next run (which waits for it if it arrives first: ``_take_warm``).
        # Starting it is a vfork + exec (about a millisecond); its start-up runs on its own.
        if self._wants_warm and self._nursery is not None:
            await self._spawn_warm()
        self.replenish()

    def _fresh_start(self) -> None:
        self._kill_all(final=True)  # no warm interpreter now: the uid sweep runs too
        wd = self.cfg.working_dir
        remove_tree(wd)
        os.mkdir(wd, 0o700)
        if self.identity.switching:
            os.chown(wd, self.identity.uid, self.identity.gid)  # type: ignore[arg-type]
        trash, self._trash = self._trash, []
        for path in trash:
            remove_tree(path)

    async def _take_warm(self) -> Warm | None:
        if self._housekeeping is not None:  # the next interpreter is about to be started: now
            self._hurry.set()  # type: ignore[union-attr]
            await self._housekeeping.wait()
        if self._warm_lock.locked():  # a spawn is under way: wait for it
            async with self._warm_lock:
                warm, self.warm = self.warm, None
        else:  # taken without a scheduler round trip (the lock only orders against a spawn)
            warm, self.warm = self.warm, None
        if warm is None:
            return None
        # Wait for the handshake: before it the pid may still be a wrapper (setpriv/prlimit) that
        # has not applied its limits yet, so tightening RLIMIT_CPU now would make it fail.
        if not warm.ready.is_set():
            with trio.move_on_after(30):
                await warm.ready.wait()
        if not warm.ready.is_set() or warm.failed or warm.exited.is_set():
            self.warm = warm
            await self._discard_warm()
            return None
        return warm

    # --- execution -------------------------------------------------------------------------
    async def execute(self, code: str, timeout: float, request_id: str,
                      args: list[str] | None = None) -> dict[str, Any]:
        """Run ``code`` once. Raises ``Conflict`` if busy, ``OSError`` if the run cannot be set up.

        ``args`` become the program's argv; a pre-warmed process was started before they were
        known, so a run with args is a cold run (``languages.with_args``).
        """
        if self.busy:
            raise Conflict("An execution is already running in this sidecar")
        self.busy = True
        self.runs += 1
        self._killed = set()
        self._tree_clean = False
        cap = self.cfg.max_output_size
        wd = self.cfg.working_dir
        warm: Warm | None = None
        tmp: str | None = None
        state: RunState | None = None
        finished = False
        started = time.perf_counter()
        exit_code = 0
        try:
            await self.settle()
            warm = await self._take_warm() if self.prewarm_enabled and not args else None
            tmp = warm.tmp if warm else make_private_tmp(self.cfg.tmp_root, self.identity)
            state = RunState(Capture(cap, cap * self.cfg.output_kill_factor),
                             Capture(cap, cap * self.cfg.output_kill_factor), tmp)
            program_file.write(wd, self.spec.source_file, code, self.identity,
                               warm.staged if warm is not None else None, log)
            before = files.snapshot(wd)
            steps = with_args(self.spec.steps(self._context(tmp)), args or [])
            kinds = {step.compile for step in steps}
            oom_before = self._oom_kills(kinds) if self.groups else 0
            # With a compile budget, compile steps have their own deadline and the program its
            # full timeout once they are done; without one, all steps share the run's timeout.
            separate = self.cfg.compile_timeout > 0
            deadline = trio.current_time() + timeout
            compile_deadline = trio.current_time() + self.cfg.compile_timeout if separate else deadline
            # The disk watcher is owned by the runner's nursery and bound to this run by its
            # scope: the run cancels it when it ends, without waiting for it to wind down (a
            # scheduler round trip on every answer); once ``state.closed`` it can stop nothing.
            disk = trio.CancelScope()
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_disk, state, disk)
            try:
                for i, step in enumerate(steps):
                    use_warm = warm if (warm is not None and i == len(steps) - 1) else None
                    if separate and not step.compile:
                        deadline = trio.current_time() + timeout  # the program's own time starts now
                    exit_code = await self._run_step(
                        step, use_warm, state, compile_deadline if step.compile else deadline,
                        self.cfg.compile_timeout if separate and step.compile else timeout,
                        "compile_timeout" if separate and step.compile else "timeout")
                    if state.reason is not None or (step.compile and exit_code != 0):
                        break
            finally:
                state.closed = True
                disk.cancel()
            if self.groups and self._oom_kills(kinds) > oom_before and state.reason is None:
                state.reason = "oom"  # the run's control group went over its memory bound
            elapsed_ms = (time.perf_counter() - started) * 1000
            after = files.snapshot(wd)
            finished = True
        finally:
            cleanup_started = time.perf_counter()
            with trio.CancelScope(shield=True):
                if not (finished and self._tree_clean):
                    await self._kill_leftovers(final=True)
                if warm is not None:
                    if warm is not self._unsettled:  # else ``settle`` closes it, after the answer
                        warm.close()
                    if not warm.used:  # taken but never started: it still waits; stop it
                        self.warm = warm
                        await self._discard_warm()
                if tmp is not None and (warm is None or warm.used):
                    self._trash.append(tmp)  # removed after the response (see replenish)
                if self.cfg.reset_between_runs:
                    self.awaiting_reset = True
                if not finished:
                    log("execution_cancelled", request_id=request_id, language=self.spec.code,
                        reason="client_disconnected_or_cancelled",
                        killed_pids=sorted(self._killed | (state.pids if state else set())),
                        cleanup_ms=round((time.perf_counter() - cleanup_started) * 1000, 1),
                        elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
                self.busy = False
        assert state is not None
        return self._result(exit_code, state, timeout, elapsed_ms, before, after, request_id)

    def _result(self, exit_code: int, state: RunState, timeout: float, elapsed_ms: float,
                before: files.Snapshot, after: files.Snapshot, request_id: str) -> dict[str, Any]:
        notes: list[str] = []
        if self.sandbox is not None and exit_signal(exit_code):  # bwrap reports 128 + signal
            exit_code = -exit_signal(exit_code)  # type: ignore[operator]
        if exit_code < 0:  # killed by a signal: shell convention
            sig = -exit_code
            if state.reason is None and sig == signal.SIGXCPU:
                state.reason = "cpu"
            elif state.reason is None and sig == signal.SIGXFSZ:
                state.reason = "file_size"
            exit_code = 128 + sig
        stderr_tail = state.err.buf[-4096:].decode("utf-8", "replace")
        if state.reason is None and exit_code != 0 and _MEMORY_PATTERNS.search(stderr_tail):
            state.reason = "memory"
        if state.reason is None and exit_code != 0 and re.search(r"File too large|EFBIG", stderr_tail):
            state.reason = "file_size"  # Python ignores SIGXFSZ, so the write fails with EFBIG
        if state.reason is None and _PIDS_PATTERNS.search(state.err.buf[:65536].decode("utf-8", "replace")):
            state.reason = "pids"
        timed_out = state.reason == "timeout"
        if timed_out:
            exit_code = 124
            notes.append(f"Execution timed out after {_fmt_seconds(timeout)} seconds")
        elif state.reason == "compile_timeout":
            exit_code = 124
            notes.append(f"Compilation timed out after {_fmt_seconds(self.cfg.compile_timeout)} seconds "
                         f"(the compile steps' own limit, KCR_COMPILE_TIMEOUT); the program did not run")
        elif state.reason == "output":
            notes.append("Process stopped: output limit exceeded")
        elif state.reason == "disk":
            notes.append(f"Process stopped: disk quota exceeded ({self.cfg.disk_quota_mb} MB "
                         f"or {self.cfg.max_files} files)")
        elif state.reason == "cpu":
            notes.append("Process stopped: CPU time limit exceeded")
        elif state.reason == "file_size":
            notes.append(f"Process stopped: file size limit exceeded ({self.cfg.max_file_size_mb} MB)")
        elif state.reason == "memory":
            notes.append(f"Memory limit exceeded ({self.cfg.max_memory_mb} MB)")
        elif state.reason == "oom":
            notes.append(f"Out of memory: the run's processes together used more than "
                         f"{self.cfg.max_memory_mb} MB (MAX_MEMORY_MB), so the kernel stopped the run")
        elif state.reason == "pids":
            notes.append(f"Process limit reached ({self.cfg.max_pids} processes)")
        stderr = state.err.text()
        for note in notes:
            if stderr and not stderr.endswith("\n"):
                stderr += "\n"
            stderr += note
        exclude = SOURCE_FILES | self.spec.byproducts
        generated = [e.as_json(with_path=False) for e in files.changed(before, after, exclude)]
        return {
            "exit_code": exit_code,
            "stdout": state.out.text(),
            "stderr": stderr,
            "execution_time_ms": round(elapsed_ms, 3),
            "state": None,
            "state_errors": None,
            "timed_out": timed_out,
            "stdout_truncated": state.out.truncated,
            "stderr_truncated": state.err.truncated,
            "killed": state.reason,
            "generated": generated,
            # [deleted_files] top-level files the run removed (the API reports removed inputs).
            "removed": sorted(set(before) - set(after) - exclude),
            "request_id": request_id,
        }

    async def _run_step(self, step: Step, warm: Warm | None, state: RunState, deadline: float,
                        timeout: float, on_deadline: str = "timeout") -> int:
        if warm is not None:
            proc = warm.process
            # The warm process was limited for MAX_EXECUTION_TIME; tighten CPU to this run
            # (rlimits are per process: in a sandbox, the interpreter below bwrap's two).
            if warm.limit_pid is not None:
                limit = cpu_limit_for(timeout) + warm.cpu_used
                try:
                    resource.prlimit(warm.limit_pid, resource.RLIMIT_CPU, (limit, limit + 1))
                except (OSError, ValueError):
                    pass
            await warm.go()
        else:
            proc = await spawn_user(self._spec_for(step, state.tmp, timeout))
            self.tracked.add(proc.pid)
        state.pids.add(proc.pid)
        reported: int | None = None
        scope = trio.CancelScope(deadline=deadline)
        state.step_scope = scope
        cleaned = early = False
        pumps = leftovers.Pumps()  # in the runner's nursery: an early answer never waits for them
        assert self._nursery is not None
        self._nursery.start_soon(self._pump, proc.stdout, state.out, state, pumps, pumps.scopes[0])
        self._nursery.start_soon(self._pump, proc.stderr, state.err, state, pumps, pumps.scopes[1])
        try:
            with scope:
                if warm is not None:
                    await warm.finished.wait()
                    reported = warm.status
                else:
                    await proc.wait()
            if scope.cancelled_caught and state.reason is None:
                state.reason = on_deadline
            # The program is done (or stopped): kill what it left behind so the pipes reach EOF,
            # then give the pumps a moment to drain what is already buffered.
            winding = leftovers.winding_down(warm) if reported is not None else frozenset()
            await self._kill_leftovers(settle=not scope.cancelled_caught, winding_down=winding)
            early = bool(winding) and self._tree_clean
            if early:
                # The program reported "done" after closing its stdout/stderr, and nothing of it
                # runs any more but the reporting interpreter itself (one step from its exit) and
                # bubblewrap's own processes: its whole output is in the pipes already. Take it
                # without waiting for EOF, which comes only once bubblewrap's monitor (it holds
                # the pipes too) has exited after the namespace's teardown. The interpreter's
                # exit is ``settle``'s business, after the answer.
                if warm is not None and warm.reporter in winding and not warm.exited.is_set():
                    self._unsettled = warm
                leftovers.drain(proc.stdout, state.out, state)
                leftovers.drain(proc.stderr, state.err, state)
            else:
                with trio.move_on_after(2):
                    await pumps.done.wait()
            # An interpreter that reported its status is already on its way out (the watcher reaps
            # it); there is no need to wait for its teardown before answering.
            cleaned = (warm.exited.is_set() or reported is not None) if warm is not None else (
                proc.returncode is not None)
        finally:
            state.step_scope = None
            pumps.cancel()
            for stream in (proc.stdout, proc.stderr):  # the pumps are done with them
                if stream is not None:
                    stream.close()
            with trio.CancelScope(shield=True):
                if not cleaned:
                    await self._kill_leftovers()
                    with trio.move_on_after(2):
                        await (warm.exited.wait() if warm is not None else proc.wait())
                self.tracked.discard(proc.pid)
        # The status the interpreter reported is the run's status: killing what the program left
        # behind (daemon threads still spinning while the interpreter exits, children) must never
        # turn a reported 0 into the SIGTERM/SIGKILL the reaper then sees.
        if reported is not None:
            return reported
        if proc.returncode is not None:
            return proc.returncode
        return -signal.SIGKILL

    async def _pump(self, stream: trio.abc.ReceiveStream | None, cap: Capture, state: RunState,
                    pumps: leftovers.Pumps, scope: trio.CancelScope) -> None:
        """Copy one pipe into ``cap`` until EOF, the step closes the stream (after taking what
        is left) or cancels ``scope``."""
        with scope:
            while stream is not None:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                if not data:
                    break
                if cap.add(data):
                    state.stop("output")
        pumps.ended()

    async def _watch_disk(self, state: RunState, scope: trio.CancelScope) -> None:
        with scope:
            await self._watch_disk_until_stopped(state)

    async def _watch_disk_until_stopped(self, state: RunState) -> None:
        """Stop the program once it has added more than the quota. The baseline is taken in a
        worker thread while the program starts (off the latency path); what it writes in that
        first moment is counted as baseline, a slack of at most a few MB."""
        quota = self.cfg.disk_quota_mb * MB
        paths = [self.cfg.working_dir, state.tmp]
        # Most runs are over within a few ms: they never pay for a worker thread competing with
        # the answer. What a program writes in this first moment is part of the baseline.
        await trio.sleep(0.005)
        # abandon_on_cancel: the run must not wait for a directory walk to notice it is over.
        base = await trio.to_thread.run_sync(files.usage, paths, abandon_on_cancel=True)
        while True:
            await trio.sleep(0.1)
            used, entries = await trio.to_thread.run_sync(files.usage, paths, abandon_on_cancel=True)
            if used - base[0] > quota or entries - base[1] > self.cfg.max_files:
                state.stop("disk")
                return

    def _kill_all(self, final: bool = True) -> set[int]:
        """Kill every descendant of the sidecar except the idle pre-warmed interpreter (blocking)."""
        keep: set[int] = set()
        if self.warm is not None:  # in a sandbox: bwrap, its reaper and the interpreter
            keep.add(self.warm.process.pid)
            keep |= proctree.descendants(self.warm.process.pid)
        uid = None
        if final and self.identity.switching and self.identity.exclusive and self.warm is None:
            uid = (self.identity.uid, self.identity.gid)
        killed = proctree.kill_tree(os.getpid(), keep=keep, grace=self.cfg.kill_grace_ms / 1000,
                                    uid=uid)  # type: ignore[arg-type]
        proctree.reap_orphans(self.tracked)
        self._killed.update(killed)
        return set(killed)

    async def _kill_leftovers(self, final: bool = False, settle: bool = False,
                              winding_down: frozenset[int] = frozenset()) -> set[int]:
        """``_kill_all`` in a worker thread, skipped when a cheap inline check finds nothing.

        Thanks to the subreaper, nothing the run started can leave the sidecar's subtree, so an
        empty subtree means there is nothing to kill (the uid sweep is then skipped too).

        ``settle`` (the program exited by itself): in a sandbox, bwrap's monitor exits as soon as
        the program's status is known, while its PID-namespace reaper is still exiting (tearing
        down the namespaces takes 1-2 ms); the kernel kills whatever is left in the namespace with
        it. A task that is already exiting can never run user code again, so it counts as gone;
        anything else gets up to 20 ms to start exiting before the kill sweep in a thread."""
        keep = {self.warm.process.pid} if self.warm is not None else set()
        if self.warm is not None:
            keep |= proctree.descendants(self.warm.process.pid)
        me = os.getpid()
        alive = not_exiting if settle else proctree.alive
        # The program ended by itself: its control groups list the run's processes in one read
        # each (``leftovers.group_members``); else, or if they cannot be read, walk the tree.
        groups = [g.procs_files[0] for g in self.groups.values()] if settle else []

        def remaining() -> tuple[set[int], bool]:
            """(every descendant outside ``keep``, whether one of them still runs) in one scan;
            ``winding_down`` (bubblewrap's own processes once the program reported "done": they
            exit by themselves, and the program's namespace dies with them) do not count."""
            members = leftovers.group_members(groups) if groups else None
            if members is not None:  # no orphan can be adopted without its group listing it
                return set(), any(alive(p) for p in members - keep - winding_down)
            tree = proctree.descendants(me) - keep
            return tree, any(alive(p) for p in tree - winding_down)

        tree, running = remaining()
        if settle and running:
            with trio.move_on_after(0.02):
                # A program that reported "done" is a few microseconds from exiting: poll finely.
                while running:
                    await trio.sleep(0.0001)
                    tree, running = remaining()
        if not running:
            if tree - self.tracked:  # adopted orphans are our zombies now (Trio reaps the tracked)
                proctree.reap_orphans(self.tracked)
            self._tree_clean = True
            return set()
        self._tree_clean = False
        return await trio.to_thread.run_sync(self._kill_all, final)


def _cpu_seconds(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields_ = fh.read().rsplit(b")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return math.ceil((int(fields_[11]) + int(fields_[12])) / ticks)
