"""The Kubernetes executor: warm pools of single-use execution pods, driven from Trio.

Composition (the app's lifespan)::

    async with open_kubernetes_executor(settings) as executor:
        ...  # executor.sandbox(lang, wait=...) per /exec, executor.status() for /ready

How it works (one concept per module):

* **One watch** over our own pods keeps an in-memory view of every pod we created
  (:mod:`.kube_watch`); nothing polls.
* **Pools** per language, sized by ``POD_POOL_<LANG>``, kept by the warm-pool model both executors
  share (:mod:`.warm_pool`). A pod leaving the pool (acquired, died, failed to start) triggers a
  replacement at once, created in the executor's nursery: requests never wait on replenishment,
  they only wait (up to ``wait``) for a *ready* pod, first come first served, then get
  ``errors.Busy`` (503 + ``Retry-After``), or a cold pod if ``KCR_COLD_POD_FALLBACK`` is on.
  Failed starts back off together (one probe pod at a time, never sooner than ``Retry-After``).
* **Starting and deleting one pod** (two clocks, refused creates, delete retries):
  :mod:`.kube_lifecycle`.
* **One run per pod** (:mod:`.kube_sandbox`). Leaving ``sandbox()`` — normally, by error, or by
  the client's disconnect cancelling the request — deletes the pod at once under a shielded scope
  with its own timeout. Cancellation closes the sidecar's HTTP connection, and the sidecar kills
  the program's process tree when that happens; the pod deletion then takes the container down
  too. A pod that dies during the run gives a ``RunResult`` saying why.
* **Readiness** (``snapshot()``): "can serve" — the pod list is synced, no language is still warming
  without a problem, one language is available; each language reports its status and reason.
* **Start-up sweep and shutdown** (:mod:`.kube_sweep`): orphans of crashed replicas and our own
  leftovers go before warming up; at shutdown the nursery is cancelled (watch and pod creations
  stop within milliseconds), then every pod with our owner UID is deleted, shielded and bounded.

All Kubernetes calls go through :mod:`kcr_trio.backends.kube_adapter`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from kcr_trio.config import Settings
from kcr_trio.core.errors import Busy, Unavailable
from kcr_trio.core.interfaces import Sandbox
from kcr_trio.core.languages import LANGUAGES

from . import kube_pods
from .kube_adapter import KubeApi, KubeError
from .kube_lifecycle import PodLifecycle, StartFailure
from .kube_sandbox import PodSandbox, SandboxFactory, pod_base_url, protocol_sandbox_factory
from .kube_settings import KubernetesSettings
from .kube_sweep import Sweeper
from .kube_watch import PodTracker, TrackedPod
from .warm_pool import WarmPool, WarmPools

log = logging.getLogger("kcr_trio.kubernetes")

# Importable from here, where the app and the tests have always found them.
__all__ = ["KubernetesExecutor", "KubernetesSettings", "PodSandbox", "SandboxFactory", "open_kubernetes_executor"]


class KubernetesExecutor:
    ptc_capable = True  # Executor: a PTC run talks to the pod's sidecar
    capacity: int | None = None  # pods are created on demand: no fixed slot count

    def __init__(
        self,
        settings: Settings,
        ksettings: KubernetesSettings,
        api: KubeApi,
        http: httpx.AsyncClient,
        *,
        sandbox_factory: SandboxFactory | None = None,
    ) -> None:
        self.settings = settings
        self.k = ksettings
        self.warnings: list[str] = []  # Executor: nothing found at start-up (problems surface in /ready)
        self.api = api
        self.http = http
        self.sandbox_factory = sandbox_factory or protocol_sandbox_factory(ksettings)
        if ksettings.kcr_pod_protocol == "kcr-runner" and settings.max_execution_time > ksettings.kcr_runner_max_execution_time:
            log.warning("MAX_EXECUTION_TIME=%s is above the runner images' cap of %gs "
                        "(KCR_RUNNER_MAX_EXECUTION_TIME): longer runs stop at the cap, and their stderr says so",
                        settings.max_execution_time, ksettings.kcr_runner_max_execution_time)
        self.owner_uid = ksettings.kcr_pod_owner_uid or str(uuid.uuid4())
        self.owner_is_pod = bool(ksettings.kcr_pod_owner_uid)
        self.template = kube_pods.PodTemplate(
            protocol=ksettings.kcr_pod_protocol,
            owner_uid=self.owner_uid,
            port=ksettings.kcr_sidecar_port,
            image_pull_policy=ksettings.k8s_image_pull_policy,
            image_pull_secrets=tuple(s.strip() for s in ksettings.k8s_image_pull_secrets.split(",") if s.strip()),
            runtime_class_name=ksettings.k8s_runtime_class_name,
            node_selector=kube_pods.parse_node_selector(ksettings.k8s_pod_node_selector),
            tolerations_json=kube_pods.check_tolerations(ksettings.k8s_pod_tolerations),
            seccomp_profile_type=ksettings.k8s_seccomp_profile_type,
        )
        self.pools: WarmPools[TrackedPod] = WarmPools(
            {lang: settings.pool_size(lang) if ksettings.supports(lang) else 0 for lang in LANGUAGES})
        self.tracker = PodTracker(api, self.owner_uid, name_prefix=ksettings.kcr_pod_name_prefix,
                                  on_unusable=self._drop_if_idle)
        self.lifecycle = PodLifecycle(api, ksettings, self.template, self.tracker)
        self.sweeper = Sweeper(api, ksettings, owner_uid=self.owner_uid, owner_is_pod=self.owner_is_pod)
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._cold = trio.CapacityLimiter(ksettings.kcr_cold_pod_max)
        self.reclaims: deque[dict[str, float]] = deque(maxlen=256)  # timings for the benchmark

    @property
    def watch_connected(self) -> bool:
        return self.tracker.connected

    @property
    def watch_rv(self) -> str:
        """The resourceVersion the watch resumes from (BOOKMARKs advance it)."""
        return self.tracker.rv

    # ------------------------------------------------------------------ public API

    @asynccontextmanager
    async def sandbox(self, language: str, *, wait: float) -> AsyncIterator[Sandbox]:
        """A ready pod of ``language`` for one run (see ``Executor.sandbox``). Leaving the context —
        also by cancellation — hands the pod's deletion to the executor's nursery (shielded,
        bounded), so the answer does not wait for it; the pod counts as in use until the delete
        was sent. Its replacement was already started when the pod was taken."""
        pool = self.pools.get(language)
        if pool is None:
            raise Unavailable(f"Unsupported language for the Kubernetes executor: {language}")
        pod = await self._acquire(pool, wait)
        try:
            inner = self.sandbox_factory(self.http, pod_base_url(pod, self.k.kcr_sidecar_port))
            yield PodSandbox(pod, inner, runner=self.k.kcr_pod_protocol == "kcr-runner",
                             memory_limit=self.k.resources(pod.language)["limits"]["memory"])
        finally:
            released = time.monotonic()
            if not self._release_after_answer(pool, pod, released):
                await self._release(pool, pod, released)

    def _release_after_answer(self, pool: WarmPool[TrackedPod], pod: TrackedPod, released: float) -> bool:
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(self._release, pool, pod, released)
        except RuntimeError:  # the nursery is closed: release inline
            return False
        return True

    async def _release(self, pool: WarmPool[TrackedPod], pod: TrackedPod, released: float) -> None:
        """After one use: delete the pod now, shielded and bounded; it stays in use until then."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                try:
                    await self.lifecycle.delete(pod)
                    self.reclaims.append({"released": released, "delete_sent": time.monotonic()})
                finally:
                    pool.release()

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """``status()`` without an await (for metrics and tests).

        ``ready`` means "can serve": the pod list is synced, no language is still warming up
        without a problem, and at least one language is available. A language whose pods cannot
        start (image missing, pods forbidden or unschedulable) is reported per language with its
        reason and counted in ``unavailable_languages``, instead of holding every replica NotReady.
        """
        pools: dict[str, dict[str, Any]] = {}
        for lang, p in self.pools.items():
            if not (p.target or p.in_use or p.starting):
                continue
            status, reason = self._language_status(p)
            pools[lang] = {"status": status, "reason": reason, "available": status == "available", **p.counts()}
        synced = self.tracker.synced.is_set()
        by_status: dict[str, list[str]] = {"available": [], "warming": [], "unavailable": []}
        for lang, fields in pools.items():
            by_status[fields["status"]].append(lang)
        ready = synced and not by_status["warming"] and (bool(by_status["available"]) or not pools)
        reason = None
        if not synced:
            reason = self.tracker.error or "listing execution pods"
        elif by_status["warming"]:
            reason = "warming up: " + ", ".join(
                f"{lang} ({pools[lang]['ready']}/{pools[lang]['target']} ready)" for lang in by_status["warming"])
        elif not ready:
            reason = "no language can run code: " + "; ".join(
                f"{lang}: {pools[lang]['reason']}" for lang in by_status["unavailable"])
        return {
            "ready": ready,
            "reason": reason,
            "warm": all(p["ready"] >= p["target"] for p in pools.values()),
            "unavailable_languages": len(by_status["unavailable"]),
            "executor": "kubernetes",
            "namespace": self.api.namespace,
            "protocol": self.k.kcr_pod_protocol,
            "owner_uid": self.owner_uid,
            "watch": "connected" if self.tracker.connected else "disconnected",
            "watch_error": self.tracker.error,
            "pools": pools,
        }

    def _language_status(self, pool: WarmPool[TrackedPod]) -> tuple[str, str | None]:
        """``(available|warming|unavailable, reason)`` for one language's pool."""
        problem = pool.problem
        if pool.ready:
            return "available", problem
        if problem:
            return "unavailable", problem
        if pool.filled_once:
            return "available", None  # every pod is in use or being replaced: requests wait
        if not self.tracker.connected and self.tracker.error:
            return "unavailable", self.tracker.error
        return "warming", None

    async def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait until every pool reached its target once (``True``), or the timeout passes."""
        return await self.pools.wait_filled_once(timeout)

    # ------------------------------------------------------------------ acquisition

    async def _acquire(self, pool: WarmPool[TrackedPod], wait: float) -> TrackedPod:
        pod = pool.take()
        if pod is not None:
            self._replenish(pool)
            return pod
        if pool.target == 0:
            if self.k.kcr_cold_pod_fallback and self.k.supports(pool.language):
                return await self._cold_pod(pool)
            suffix = LANGUAGES[pool.language].env_suffix
            if not self.k.supports(pool.language):
                raise Unavailable(
                    f"Language '{pool.language}' is not available with {self.k.kcr_pod_protocol} images"
                )
            raise Unavailable(
                f"No execution pods are configured for '{pool.language}' (POD_POOL_{suffix}=0) "
                "and cold pods are disabled (KCR_COLD_POD_FALLBACK)"
            )
        # Cancelled (the client left): a pod handed to us in the meantime goes to the next.
        pod = await pool.wait_for(wait)
        if pod is not None:
            self._replenish(pool)
            return pod
        if self.k.kcr_cold_pod_fallback:
            return await self._cold_pod(pool)
        raise Busy(
            f"No {LANGUAGES[pool.language].name} execution pod became free within {wait:g}s; "
            "please retry",
            retry_after=self.settings.kcr_busy_retry_after,
        )

    async def _cold_pod(self, pool: WarmPool[TrackedPod]) -> TrackedPod:
        """Start a pod for this request alone (no warm one is available)."""
        async with self._cold:
            pod = self.tracker.register(pool.language)
            failed = await self.lifecycle.bring_up(pod, kind="cold")
            if failed is not None:
                raise Unavailable(failed[0])
            return pool.claim(pod)

    # ------------------------------------------------------------------ keeping pools full

    def _replenish(self, pool: WarmPool[TrackedPod]) -> None:
        """Start as many pods as the pool decides (see ``WarmPool.plan_starts``). Never blocks."""
        if self._closing or self._nursery is None:
            return
        for _ in range(pool.plan_starts(self.k.kcr_pod_create_parallel)):
            self._nursery.start_soon(self._start_pod, pool)

    async def _start_pod(self, pool: WarmPool[TrackedPod]) -> None:
        failed: StartFailure | None = ("not started", None)
        try:
            await self.tracker.synced.wait()
            pod = self.tracker.register(pool.language)
            failed = await self.lifecycle.bring_up(pod, kind="pool", pool=pool)
        finally:
            pool.start_ended()
        if failed is None:
            pool.start_succeeded(pod)
            # This slot is free again: start the next pod if the pool is still short (a pool larger
            # than KCR_POD_CREATE_PARALLEL fills in waves without waiting for traffic).
            self._replenish(pool)
            return
        reason, retry_after = failed
        if reason != pool.last_error:
            log.warning("pool %s: %s", pool.language, reason)
        delay = pool.start_failed(reason, retry_after)
        if delay is None:
            return  # pods that failed together back off together: one retry for all of them
        try:
            await trio.sleep(delay)
        finally:
            pool.backoff_ended()
        self._replenish(pool)

    def _drop_if_idle(self, pod: TrackedPod) -> None:
        """A warm pod that stopped being usable: forget it, delete it, replace it."""
        pool = self.pools[pod.language]
        if pool.remove(pod):
            pool.last_error = pod.failure
            if not pod.gone and self._nursery is not None and not self._closing:
                self._nursery.start_soon(self.lifecycle.delete, pod)
            self._replenish(pool)

    # ------------------------------------------------------------------ start-up and shutdown

    async def sweep(self) -> int:
        """Delete orphaned pods of crashed replicas and our own leftovers (see :mod:`.kube_sweep`)."""
        return await self.sweeper.sweep()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work until cancelled; then delete our pods (shielded, bounded)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.lifecycle.nursery = nursery
                try:
                    await self.sweeper.sweep()
                except KubeError as exc:  # not fatal: retried in the background
                    log.warning("start-up sweep failed, retrying in the background: %s", exc)
                    nursery.start_soon(self.sweeper.sweep_later, exc.retry_after)
                nursery.start_soon(self.tracker.run)
                for pool in self.pools.values():
                    self._replenish(pool)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closing = True
            self._nursery = self.lifecycle.nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                await self.sweeper.delete_all_ours(self.tracker.pods)


@asynccontextmanager
async def open_kubernetes_executor(
    settings: Settings,
    ksettings: KubernetesSettings | None = None,
    *,
    sandbox_factory: SandboxFactory | None = None,
) -> AsyncIterator[KubernetesExecutor]:
    """Connect, sweep orphans, start warming the pools, and yield the executor at once (``/ready``
    reports warmth; use ``wait_warm()`` to block on it). On exit the background work stops and our
    pods are deleted, shielded and bounded."""
    k = ksettings or KubernetesSettings()
    api = await KubeApi.connect(k.kubeconfig or None, k.execution_namespace(), read_timeout=k.kcr_k8s_request_timeout)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, connect=5.0)) as http:
            executor = KubernetesExecutor(settings, k, api, http, sandbox_factory=sandbox_factory)
            async with trio.open_nursery() as nursery:
                await nursery.start(executor.run)
                try:
                    yield executor
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        api.close()
