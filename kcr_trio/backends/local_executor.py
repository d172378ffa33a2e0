"""``LocalExecutor``: warm pools of local sidecar processes, each serving many runs one at a time.

The embedded default executor. This module is its pool policy and the ``Executor`` protocol;
``local_sidecars`` starts and destroys the sidecar processes (``SidecarProcesses``, the base
class), ``local_settings`` holds ``KCR_LOCAL_*`` and the sandbox decision. The names callers
import (``open_local_executor``, ``LocalExecutor``, ``LocalExecutorSettings``,
``SandboxUnavailable``, ``decide_sandbox``) stay importable from here.

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

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio

from kcr_trio.config import Settings
from kcr_trio.core.errors import Busy, Unavailable, unsupported_language
from kcr_trio.core.languages import COMPILED, LANGUAGES
from sidecar import host

from .local_settings import LocalExecutorSettings, SandboxUnavailable, decide_sandbox
from .local_sidecars import LocalSidecar, SidecarProcesses
from .sidecar_client import SidecarSandbox
from .warm_pool import WarmPools

__all__ = ["LocalExecutor", "LocalExecutorSettings", "SandboxUnavailable", "decide_sandbox",
           "open_local_executor"]

log = logging.getLogger("kcr_trio.local_executor")
# The release starts this long after the sandbox was handed back: the answer, already on its way
# in the same event loop, goes out first instead of sharing the CPU with the release's HTTP call.
RELEASE_DELAY = 0.005
# How long a run waits for a sidecar of its language (being reset or started) before it starts
# one itself.
RETURN_WAIT = 5.0


class LocalExecutor(SidecarProcesses):
    """Per-language warm pools of sidecars behind ``MAX_CONCURRENT_EXECUTIONS`` slots."""

    ptc_capable = True  # Executor: every sandbox is a sidecar, which carries the PTC channel

    def __init__(self, settings: Settings, local: LocalExecutorSettings, nursery: trio.Nursery,
                 http: httpx.AsyncClient) -> None:
        super().__init__(settings, local)
        self._nursery = nursery
        self._http = http
        self.capacity = settings.max_concurrent_executions
        self._slots = trio.Semaphore(self.capacity)
        self.in_use = 0
        self._targets = {code: settings.pool_size(code) for code in LANGUAGES}
        # The shared warm-pool model (warm_pool.py): warm sidecars, the runs queued for one, the
        # sidecars coming (being reset or started for a miss) and the keep / make-room rules.
        self.pools: WarmPools[LocalSidecar] = WarmPools(self._targets)
        self._wake: dict[str, trio.Event] = {c: trio.Event() for c in LANGUAGES}
        self._filled: set[str] = set()
        self._closing = False

    # --- Executor protocol ----------------------------------------------------------------
    def sandbox(self, language: str, *, wait: float) -> AbstractAsyncContextManager[SidecarSandbox]:
        """``Executor.sandbox``: entering takes a slot and a sidecar (``_lease``); leaving, also by
        error or cancellation, hands the sidecar to the release (``_hand_back``) and returns at
        once. A small class rather than ``@asynccontextmanager``: every run enters and leaves it,
        and the generator machinery was ~10 Python calls and a ``StopAsyncIteration`` of that."""
        return _Lease(self, language, wait)

    async def _lease(self, language: str, wait: float) -> LocalSidecar:
        """A slot and a sidecar of ``language`` for one run (counted in use), or an error."""
        lang = language.strip().lower()
        if lang not in LANGUAGES:
            raise unsupported_language(language)
        if self._closing:
            raise Unavailable("The executor is shutting down")
        missing = self.missing.get(lang)
        if missing:
            raise Unavailable(f"Language {lang!r} is not available on this server: {missing}")
        await trio.lowlevel.checkpoint_if_cancelled()  # as ``acquire`` did: a gone caller takes nothing
        try:
            self._slots.acquire_nowait()  # a free slot (no one queues while one is free): no wait
        except trio.WouldBlock:
            with trio.move_on_after(wait) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise Busy(f"All {self.capacity} execution slots are busy; try again shortly",
                           retry_after=self.settings.kcr_busy_retry_after) from None
        sidecar: LocalSidecar | None = None
        self.in_use += 1
        try:
            sidecar = await self._take(lang, wait)
            if len(self.pools[lang].ready) < self._targets[lang]:
                self._wake[lang].set()  # the replenisher refills; above target it has nothing to do
            if sidecar is None:
                sidecar = self.pools[lang].claim(await self._start(lang))
        except BaseException:
            with trio.CancelScope(shield=True):
                if sidecar is not None:
                    self.pools[lang].release()
                    await self._destroy(sidecar)
                self._free_slot()
            raise
        return sidecar

    def _sandbox_for(self, sidecar: LocalSidecar) -> SidecarSandbox:
        # The sidecar refuses timeouts above MAX_EXECUTION_TIME (422); callers never ask for more,
        # but a clamp keeps a rounding slip from becoming an error.
        return SidecarSandbox(sidecar.url, client=self._http,
                              timeout_cap=float(self.settings.max_execution_time),
                              compile_timeout=self.settings.kcr_compile_timeout
                              if sidecar.language in COMPILED else 0.0,
                              wire=sidecar.wire)

    async def _take(self, lang: str, wait: float) -> LocalSidecar | None:
        """A warm sidecar of ``lang`` from its pool, or None (then the caller starts one cold).

        On a miss the pool grows as before (one more sidecar, up to ``max(target, capacity)``),
        but in the background (``_grow``), and the run takes whichever sidecar of ``lang`` is
        ready first: one coming back from its reset (milliseconds) or the new one. Before, a miss
        always waited for its own cold start (~0.4 s of CPU): at c=1 back to back with a pool of
        one, the second request did (the bash p99 of ~0.5 s). A sidecar that comes back goes to
        the first waiter directly (``WarmPool.offer``): a waiter is never overtaken by a later run."""
        pool = self.pools[lang]
        while (candidate := pool.take()) is not None:
            if candidate.process.returncode is None:
                return candidate
            pool.release()
            await self._destroy(candidate)
        self._grow(lang)
        return await pool.wait_for_coming(min(wait, RETURN_WAIT))

    def _grow(self, lang: str) -> None:
        """Start one more sidecar of ``lang`` in the background after a miss, unless the language
        already has ``max(target, capacity)`` (the most its pool keeps): the pool follows demand."""
        if self._closing:
            return
        live = sum(1 for s in self._live if s.language == lang)
        pool = self.pools[lang]
        if not pool.plan_grow(live, self.capacity):
            return
        try:
            self._nursery.start_soon(self._start_for_pool, lang)
        except RuntimeError:  # the nursery is closed (shutdown)
            pool.grow_ended()

    async def _start_for_pool(self, lang: str) -> None:
        """``_grow``'s start: the new sidecar goes to a waiting run or the pool; never raises."""
        pool = self.pools[lang]
        sidecar: LocalSidecar | None = None
        try:
            sidecar = await self._start(lang)
            if not self._closing:
                pool.offer(sidecar)  # before the count drops: the waiter it is for is still queued
                sidecar = None
        except Unavailable as exc:
            log.warning("could not start a %s sidecar: %s", lang, exc.message)
        finally:
            pool.grow_ended()
            pool.dismiss_excess_waiters()
        if sidecar is not None:  # started while shutting down
            await self._destroy(sidecar)

    def _hand_back(self, sidecar: LocalSidecar) -> None:
        """Leave the release to the executor's nursery: the caller answers now, the slot stays
        counted busy until ``_release`` ends (capacity is never overstated)."""
        try:
            self._nursery.start_soon(self._release, sidecar)
        except RuntimeError:  # the nursery is closed (shutdown): aclose() kills every sidecar
            self.pools[sidecar.language].release()
            self._free_slot()

    def _free_slot(self) -> None:
        self.in_use -= 1
        self._slots.release()

    async def _release(self, sidecar: LocalSidecar) -> None:
        """Reset the sidecar for its next run, or destroy it; then free the slot. Shielded (a
        shutdown must not leave a used sandbox in a pool) and bounded; never raises."""
        pool = self.pools[sidecar.language]
        pool.returning += 1
        handed = False
        try:
            with trio.CancelScope(shield=True):
                await trio.sleep(RELEASE_DELAY)
                if await self._reset(sidecar):
                    sidecar.runs += 1
                    handed = True
                    pool.put_back(sidecar)  # to the first waiting run, else warm
                else:
                    handed = True
                    pool.release()
                    await self._destroy(sidecar)
        finally:
            if not handed:
                pool.release()
            pool.returning -= 1
            pool.dismiss_excess_waiters()
            self._free_slot()

    def _keep(self, sidecar: LocalSidecar) -> bool:
        """Whether a used sidecar goes back to its pool (after a reset) rather than away.

        Each language keeps at most ``max(target, capacity)`` idle sidecars, and all languages
        together at most ``capacity`` beyond their targets, so a burst of rare languages cannot
        pin memory; ``kcr_local_max_runs_per_sidecar`` bounds any slow leak in a sidecar. When
        that shared allowance is used up by idle sidecars of other languages, the one idle longest
        in the language with the most beyond its target makes room (``WarmPools.make_room``): the
        allowance follows demand. Before, after load moved from one language to another, every
        run of the new one destroyed its sidecar and the next cold-started one (~0.4 s of CPU)."""
        lang = sidecar.language
        if self._closing or sidecar.process.returncode is not None:
            return False
        if sidecar.runs + 1 >= self.local.kcr_local_max_runs_per_sidecar:
            return False
        if self.pools.may_keep(lang, self.capacity):
            return True
        pool = self.pools[lang]
        if len(pool.ready) >= max(pool.target, self.capacity):
            return False  # the language's own bound, not the shared allowance
        victim = self.pools.make_room(lang)
        if victim is None:
            return False
        try:
            self._nursery.start_soon(self._destroy, victim)
        except RuntimeError:  # the nursery is closed (shutdown): aclose() kills every sidecar
            return False
        return True

    async def _reset(self, sidecar: LocalSidecar) -> bool:
        """``POST /reset``: the sidecar kills everything of the last run, replaces its working
        directory and starts a fresh interpreter (``sidecar.runner.Runner.reset``). Sent on the
        sidecar's kept-alive run connection (``sidecar_wire``): the run is over, so it is free, and
        httpx cost ~0.5 ms of the server's CPU per request (a 2-core host's CPU is latency)."""
        if not self._keep(sidecar):
            return False
        limit = self.local.kcr_local_reset_timeout
        with trio.move_on_after(limit):
            try:
                resp = await sidecar.wire.post("/reset", b"", headers=[], timeout=limit + 1)
            except httpx.HTTPError as exc:
                log.warning("sidecar reset failed: %s", exc)
                return False
            if resp.status_code == 200:
                return not self._closing
            log.warning("sidecar reset answered %s", resp.status_code)
        return False

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        pools = {code: {"warm": len(self.pools[code].ready), "target": self._targets[code]}
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
        pool = self.pools[lang]
        failures = 0
        while True:
            while len(pool.ready) < target and not self._closing:
                try:
                    sidecar = await self._start(lang)
                except Unavailable as exc:
                    failures += 1
                    self._filled.add(lang)  # readiness must not hang on a broken toolchain
                    log.warning("could not start a %s sidecar: %s", lang, exc.message)
                    await trio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                    continue
                failures = 0
                pool.offer(sidecar)  # a run waiting for one gets it, else the pool
            self._filled.add(lang)
            self._wake[lang] = trio.Event()
            await self._wake[lang].wait()


    async def aclose(self) -> None:
        self._closing = True
        for pool in self.pools.values():
            pool.ready.clear()
        await self._close_processes()


class _Lease(AbstractAsyncContextManager[SidecarSandbox]):
    """One ``LocalExecutor.sandbox(...)`` context: the sidecar it holds between enter and exit."""

    __slots__ = ("_executor", "_language", "_sidecar", "_wait")

    def __init__(self, executor: LocalExecutor, language: str, wait: float) -> None:
        self._executor, self._language, self._wait = executor, language, wait
        self._sidecar: LocalSidecar | None = None

    async def __aenter__(self) -> SidecarSandbox:
        sidecar = await self._executor._lease(self._language, self._wait)
        try:
            sandbox = self._executor._sandbox_for(sidecar)
        except BaseException:
            self._executor._hand_back(sidecar)
            raise
        self._sidecar = sidecar
        return sandbox

    async def __aexit__(self, *exc_info: object) -> None:
        sidecar, self._sidecar = self._sidecar, None
        if sidecar is not None:
            self._executor._hand_back(sidecar)


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
                await trio.to_thread.run_sync(executor.sweep_dead_servers)
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
