"""The Kubernetes executor: warm pools of single-use execution pods, driven from Trio.

Composition (the app's lifespan)::

    async with open_kubernetes_executor(settings) as executor:
        ...  # executor.sandbox(lang, wait=...) per /exec, executor.status() for /ready

How it works:

* **One watch** over our own pods (selector: our variant label + our owner UID) keeps an
  in-memory view of every pod we created. Readiness, failures and deletions are all learnt from
  it; nothing polls. The watch resumes from its ``resourceVersion`` and re-lists after a 410.
* **Pools** per language, sized by ``POD_POOL_<LANG>``. A pod leaving the pool (acquired, died,
  failed to start) triggers a replacement at once, created in the executor's nursery: requests
  never wait on replenishment, they only wait (up to ``wait``) for a *ready* pod, first come
  first served, then get ``errors.Busy`` (503 + ``Retry-After``), or a cold pod if
  ``KCR_COLD_POD_FALLBACK`` is on.
* **One run per pod.** Leaving ``sandbox()`` — normally, by error, or by the client's disconnect
  cancelling the request — deletes the pod at once under a shielded scope with its own timeout.
  Cancellation closes the sidecar's HTTP connection, and the sidecar kills the program's process
  tree when that happens; the pod deletion then takes the container down too.
* **Pod failures** (OOMKilled, evicted, killed, image pull errors) are read from the pod status:
  a run on a pod that dies returns a ``RunResult`` whose ``failure`` and ``stderr`` say why.
* **Starting pods** (``_bring_up``): creation → container started is bounded by
  ``KCR_POD_START_TIMEOUT`` (scheduling, first image pulls), started → Ready by
  ``KCR_POD_READY_TIMEOUT``. Unschedulable pods and image pulls the kubelet retries are waited on
  with their reason shown; permanent errors give the pod up at once. A create the API refused (403
  from RBAC, Pod Security or a quota; 429) is not followed by a DELETE; failures back off together
  (one probe pod at a time, never sooner than ``Retry-After``).
* **Readiness** (``snapshot()``): "can serve" — the pod list is synced, no language is still warming
  without a problem, one language is available; each language reports its status and reason.
* **Start-up sweep**: pods of ours whose owner (an API replica's pod UID) no longer exists —
  a crashed replica — and pods carrying our own UID from an earlier run of this same pod (a
  container restart) are deleted before warming up. If the API pods cannot be listed, only our
  own leftovers go; a failed sweep is retried in the background.
* **Shutdown**: the nursery is cancelled (watch and pod creations stop within milliseconds), then
  every pod with our owner UID is deleted, shielded and bounded.

All Kubernetes calls go through :mod:`kcr_trio.backends.kube_adapter`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import string
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kcr_trio.config import Settings
from kcr_trio.core.errors import Busy, Unavailable
from kcr_trio.core.interfaces import Sandbox
from kcr_trio.core.languages import LANGUAGES
from kcr_trio.core.model import GeneratedFile, RunResult

from . import kube_pods
from .kube_adapter import KubeApi, KubeError, default_namespace

log = logging.getLogger("kcr_trio.kubernetes")

_NAME_ALPHABET = string.ascii_lowercase + string.digits


class KubernetesSettings(BaseSettings):
    """Kubernetes executor settings; names are KubeCodeRun's where they exist, ours are ``KCR_``."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="allow"
    )

    k8s_namespace: str = ""  # where execution pods run; "" → POD_NAMESPACE/NAMESPACE → SA → default
    pod_namespace: str = ""  # our own namespace (downward API)
    namespace: str = ""  # KubeCodeRun's alternative name for the same
    kubeconfig: str = ""  # KUBECONFIG; in-cluster config is used when running in a pod without it
    k8s_image_registry: str = "aronmuon/kubecoderun"
    k8s_image_tag: str = "latest"
    k8s_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    k8s_image_pull_secrets: str = ""  # comma-separated secret names
    k8s_runtime_class_name: str = ""
    k8s_pod_node_selector: str = ""  # JSON object (or k=v,k2=v2)
    k8s_pod_tolerations: str = ""  # JSON list
    k8s_seccomp_profile_type: str = "RuntimeDefault"
    k8s_cpu_limit: str = "1"
    k8s_memory_limit: str = "512Mi"
    k8s_cpu_request: str = "100m"
    k8s_memory_request: str = "128Mi"

    kcr_pod_owner_uid: str = ""  # our API pod's UID (downward API); random when unset
    kcr_pod_name_prefix: str = "trio-pool"
    kcr_pod_protocol: Literal["kcr-trio", "kcr-runner"] = "kcr-trio"
    kcr_sidecar_port: int = Field(8080, ge=1, le=65535)
    # MAX_EXECUTION_TIME the KubeCodeRun runner images were built with (they clamp to it silently).
    kcr_runner_max_execution_time: float = Field(120.0, gt=0)
    kcr_cold_pod_fallback: bool = False
    kcr_cold_pod_max: int = Field(4, ge=1)  # cold pods starting at once
    # Creation → container started: scheduling (an autoscaler adding a node) and the image pull (a
    # first pull of a multi-GB image takes minutes). Pull errors the kubelet retries and an
    # Unschedulable pod are waited on, with their reason shown, until this passes.
    kcr_pod_start_timeout: float = Field(600.0, gt=0)
    kcr_pod_ready_timeout: float = Field(120.0, gt=0)  # container started → Ready, else replaced
    kcr_pod_delete_grace: int = Field(1, ge=0)  # gracePeriodSeconds when deleting a used pod
    kcr_pod_create_parallel: int = Field(5, ge=1)  # pods starting at once per language
    kcr_k8s_request_timeout: float = Field(15.0, gt=0)  # read timeout of one API call
    kcr_k8s_cleanup_timeout: float = Field(10.0, gt=0)  # bound on shielded deletes
    kcr_pod_sweep_orphans: bool = True

    def lang_value(self, kind: str, language: str) -> str | None:
        """``LANG_<KIND>_<L>`` (e.g. ``LANG_IMAGE_PY``): one setting per language, so they are not
        declared fields; read from init arguments / ``.env`` extras, then the environment."""
        key = f"LANG_{kind}_{LANGUAGES[language].env_suffix}".upper()
        extra = {k.upper(): v for k, v in (self.model_extra or {}).items()}
        value = extra.get(key)
        if value in (None, ""):
            value = next((v for k, v in os.environ.items() if k.upper() == key), None)
        return str(value) if value not in (None, "") else None

    def image(self, language: str) -> str:
        return self.lang_value("image", language) or (
            f"{self.k8s_image_registry}-{kube_pods.IMAGE_SUFFIX[language]}:{self.k8s_image_tag}"
        )

    def resources(self, language: str) -> dict[str, dict[str, str]]:
        return {
            "limits": {
                "cpu": self.lang_value("cpu_limit", language) or self.k8s_cpu_limit,
                "memory": self.lang_value("memory_limit", language) or self.k8s_memory_limit,
            },
            "requests": {
                "cpu": self.lang_value("cpu_request", language) or self.k8s_cpu_request,
                "memory": self.lang_value("memory_request", language) or self.k8s_memory_request,
            },
        }

    def execution_namespace(self) -> str:
        return default_namespace(self.k8s_namespace, self.pod_namespace, self.namespace)

    def own_namespace(self) -> str:
        return default_namespace(self.pod_namespace, self.namespace, self.k8s_namespace)

    def supports(self, language: str) -> bool:
        return not (self.kcr_pod_protocol == "kcr-runner" and language in kube_pods.RUNNER_UNSUPPORTED)


# ---------------------------------------------------------------------------------------------
# in-memory state


@dataclass(eq=False)
class _Pod:
    """One pod we created, as the watch last showed it."""

    name: str
    language: str
    created: float = field(default_factory=time.monotonic)
    view: kube_pods.PodView | None = None
    gone: bool = False  # DELETED seen (or never existed)
    first_failure: str | None = None
    deleted_at: float | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def update(self, view: kube_pods.PodView | None, *, gone: bool = False) -> None:
        self.view = view or self.view
        if view is not None and view.failure and self.first_failure is None:
            # Kept: the kubelet follows a permanent pull error with a bare "Back-off pulling image".
            self.first_failure = view.failure
        if gone and not self.gone:
            self.gone = True
            self.deleted_at = time.monotonic()
        self.changed.set()
        self.changed = trio.Event()

    @property
    def ready(self) -> bool:
        return bool(self.view and self.view.ready and not self.view.terminating and not self.gone)

    @property
    def failure(self) -> str | None:
        if self.view and self.view.failure:
            return self.view.failure
        if self.first_failure:
            return self.first_failure
        if self.gone or (self.view and self.view.terminating):
            return f"Execution pod {self.name} was deleted while in use"
        return None

    async def wait_for(self, predicate: Callable[[_Pod], bool]) -> None:
        while not predicate(self):
            await self.changed.wait()


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    pod: _Pod | None = None
    abandoned: bool = False


@dataclass(eq=False)
class _Pool:
    language: str
    target: int
    ready: deque[_Pod] = field(default_factory=deque)
    starting: int = 0
    in_use: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)
    warmed: bool = False  # reached its target at least once
    last_error: str | None = None  # why the last pod failed to start
    waiting: str | None = None  # why a starting pod is still waiting (unschedulable, pull retries)
    failures_in_a_row: int = 0
    retry_scheduled: bool = False  # a failed start is backing off; it will replenish
    refilled: trio.Event = field(default_factory=trio.Event)  # set whenever a pod becomes ready

    def offer(self, pod: _Pod) -> None:
        """A ready pod: hand it to the longest-waiting request, else keep it warm."""
        while self.waiters:
            w = self.waiters.popleft()
            if not w.abandoned:
                w.pod = pod
                w.event.set()
                return
        self.ready.append(pod)
        if len(self.ready) >= self.target:
            self.warmed = True
        self.refilled.set()
        self.refilled = trio.Event()


# ---------------------------------------------------------------------------------------------
# the sandbox handed to the core


SandboxFactory = Callable[[httpx.AsyncClient, str], Sandbox]


def _sidecar_sandbox(client: httpx.AsyncClient, base_url: str) -> Sandbox:
    from .sidecar_client import SidecarSandbox

    return SidecarSandbox(base_url, client=client)


def _protocol_sandbox_factory(k: KubernetesSettings) -> SandboxFactory:
    """Our sidecar, or KubeCodeRun's runner with its quirks handled (:mod:`.kube_runner`)."""
    if k.kcr_pod_protocol != "kcr-runner":
        return _sidecar_sandbox
    from .kube_runner import RunnerSandbox

    cap = k.kcr_runner_max_execution_time
    return lambda client, base_url: RunnerSandbox(base_url, client=client, runner_cap=cap)


class PodSandbox:
    """A sidecar sandbox on one pod, which turns "the pod died" into a readable result."""

    def __init__(self, executor: KubernetesExecutor, pod: _Pod, inner: Sandbox) -> None:
        self._executor = executor
        self.pod = pod
        self._inner = inner

    @property
    def pod_name(self) -> str:
        return self.pod.name

    async def put_file(self, name: str, chunks: AsyncIterable[bytes]) -> None:
        try:
            await self._inner.put_file(name, chunks)
        except Unavailable as exc:
            reason = await self._executor._failure_reason(self.pod, exc)
            raise Unavailable(reason) from exc

    async def run(self, code: str, *, timeout: float, request_id: str, args: Sequence[str] = ()) -> RunResult:
        result: RunResult | None = None
        error: Unavailable | None = None
        async with trio.open_nursery() as nursery:

            async def on_pod_death() -> None:
                await self.pod.wait_for(lambda p: p.failure is not None)
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_pod_death)
            try:
                result = await self._inner.run(code, timeout=timeout, request_id=request_id, args=args)
            except Unavailable as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if result is not None and result.failure is None:
            if self._executor.k.kcr_pod_protocol == "kcr-runner" and result.exit_code == -1 and not result.timed_out:
                return await self._signal_death(result)
            return result
        # The pod died, or the sidecar could not be reached: say why, from the pod's status.
        cause: BaseException | str | None = error or (result.failure if result else None)
        reason = await self._executor._failure_reason(self.pod, cause)
        code_ = self.pod.view.exit_code if self.pod.view and self.pod.view.exit_code is not None else -1
        return RunResult(exit_code=code_, stdout="", stderr=reason, failure=reason)

    async def _signal_death(self, result: RunResult) -> RunResult:
        """KubeCodeRun's runner answers -1 with empty stderr when the program died of a signal. If
        the whole container went (an OOM kill of the pod), its status says why; otherwise say
        what we know."""
        with trio.move_on_after(1.0):
            await self.pod.wait_for(lambda p: p.failure is not None)
        if self.pod.failure:
            code_ = self.pod.view.exit_code if self.pod.view and self.pod.view.exit_code is not None else -1
            return RunResult(exit_code=code_, stdout=result.stdout, stderr=self.pod.failure, failure=self.pod.failure,
                             duration_ms=result.duration_ms)
        memory = self._executor.k.resources(self.pod.language)["limits"]["memory"]
        from .kube_runner import append_line

        result.stderr = append_line(result.stderr, (
            "The program was killed by a signal. The execution image (KubeCodeRun's runner) does not "
            f"report which signal; running out of memory (limit {memory}) is the usual cause."))
        return result

    async def generated_files(self) -> list[GeneratedFile]:
        try:
            return await self._inner.generated_files()
        except Unavailable as exc:
            raise Unavailable(await self._executor._failure_reason(self.pod, exc)) from exc

    def open_file(self, name: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._inner.open_file(name)


# ---------------------------------------------------------------------------------------------
# the executor


class KubernetesExecutor:
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
        self.api = api
        self.http = http
        self.sandbox_factory = sandbox_factory or _protocol_sandbox_factory(ksettings)
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
        self.pools = {
            lang: _Pool(lang, settings.pool_size(lang) if ksettings.supports(lang) else 0)
            for lang in LANGUAGES
        }
        self._pods: dict[str, _Pod] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._watch_synced = trio.Event()
        self.watch_connected = False
        self._watch_error: str | None = None
        self.watch_rv = ""  # the resourceVersion the watch resumes from (BOOKMARKs advance it)
        self._cold = trio.CapacityLimiter(ksettings.kcr_cold_pod_max)
        self.reclaims: deque[dict[str, float]] = deque(maxlen=256)  # timings for the benchmark

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
            host = _host(pod.view.ip if pod.view else None)
            inner = self.sandbox_factory(self.http, f"http://{host}:{self.k.kcr_sidecar_port}")
            yield PodSandbox(self, pod, inner)
        finally:
            released = time.monotonic()
            if not self._release_after_answer(pool, pod, released):
                await self._release(pool, pod, released)

    def _release_after_answer(self, pool: _Pool, pod: _Pod, released: float) -> bool:
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(self._release, pool, pod, released)
        except RuntimeError:  # the nursery is closed: release inline
            return False
        return True

    async def _release(self, pool: _Pool, pod: _Pod, released: float) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                await self._discard(pool, pod, released)

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
            pools[lang] = {
                "status": status,
                "reason": reason,
                "available": status == "available",
                "target": p.target,
                "ready": len(p.ready),
                "starting": p.starting,
                "in_use": p.in_use,
                "waiting": sum(1 for w in p.waiters if not w.abandoned),
                "warmed": p.warmed or p.target == 0,
                "last_error": p.last_error,
            }
        synced = self._watch_synced.is_set()
        by_status: dict[str, list[str]] = {"available": [], "warming": [], "unavailable": []}
        for lang, fields in pools.items():
            by_status[fields["status"]].append(lang)
        ready = synced and not by_status["warming"] and (bool(by_status["available"]) or not pools)
        reason = None
        if not synced:
            reason = self._watch_error or "listing execution pods"
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
            "watch": "connected" if self.watch_connected else "disconnected",
            "watch_error": self._watch_error,
            "pools": pools,
        }

    def _language_status(self, pool: _Pool) -> tuple[str, str | None]:
        """``(available|warming|unavailable, reason)`` for one language's pool."""
        problem = pool.waiting or (pool.last_error if pool.failures_in_a_row else None)
        if pool.ready:
            return "available", problem
        if problem:
            return "unavailable", problem
        if pool.warmed or pool.target == 0:
            return "available", None  # every pod is in use or being replaced: requests wait
        if not self.watch_connected and self._watch_error:
            return "unavailable", self._watch_error
        return "warming", None

    async def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait until every pool reached its target once (``True``), or the timeout passes."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            for pool in self.pools.values():
                while not (pool.warmed or pool.target == 0):
                    await pool.refilled.wait()
            return True
        return False

    # ------------------------------------------------------------------ acquisition

    async def _acquire(self, pool: _Pool, wait: float) -> _Pod:
        if pool.ready:
            return self._take(pool, pool.ready.popleft())
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
        waiter = _Waiter()
        pool.waiters.append(waiter)
        try:
            with trio.move_on_after(wait):
                await waiter.event.wait()
        except BaseException:
            # Cancelled (the client left): a pod handed to us in the meantime goes to the next.
            self._abandon(pool, waiter)
            if waiter.pod is not None:
                pool.offer(waiter.pod)
            raise
        self._abandon(pool, waiter)
        if waiter.pod is not None:
            return self._take(pool, waiter.pod)
        if self.k.kcr_cold_pod_fallback:
            return await self._cold_pod(pool)
        raise Busy(
            f"No {LANGUAGES[pool.language].name} execution pod became free within {wait:g}s; "
            "please retry",
            retry_after=self.settings.kcr_busy_retry_after,
        )

    def _abandon(self, pool: _Pool, waiter: _Waiter) -> None:
        waiter.abandoned = True
        if waiter.pod is None:
            try:
                pool.waiters.remove(waiter)
            except ValueError:
                pass

    def _take(self, pool: _Pool, pod: _Pod) -> _Pod:
        pool.in_use += 1
        self._replenish(pool)
        return pod

    async def _cold_pod(self, pool: _Pool) -> _Pod:
        """Start a pod for this request alone (no warm one is available)."""
        async with self._cold:
            pod = self._register(pool.language)
            failed = await self._bring_up(pod, kind="cold")
            if failed is not None:
                raise Unavailable(failed[0])
            pool.in_use += 1
            return pod

    async def _discard(self, pool: _Pool, pod: _Pod, released: float) -> None:
        """After one use: delete the pod now. Shielded by the caller, bounded by its timeout."""
        try:
            await self._delete(pod)
            self.reclaims.append({"released": released, "delete_sent": time.monotonic()})
        finally:
            pool.in_use -= 1

    async def _delete(self, pod: _Pod) -> None:
        if pod.gone:
            self._pods.pop(pod.name, None)
            return
        try:
            gone = not await self.api.delete_pod(pod.name, grace_seconds=self.k.kcr_pod_delete_grace)
        except KubeError as exc:
            log.warning("deleting pod %s failed (%s); retrying in the background", pod.name, exc)
            if self._nursery is not None and not self._closing:
                self._nursery.start_soon(self._delete_later, pod)
            return
        if gone:
            pod.update(None, gone=True)
            self._pods.pop(pod.name, None)

    async def _delete_later(self, pod: _Pod) -> None:
        for delay in (0.5, 1, 2, 5, 10, 30):
            await trio.sleep(delay)
            try:
                if not await self.api.delete_pod(pod.name, grace_seconds=0):
                    pod.update(None, gone=True)
                    self._pods.pop(pod.name, None)
                return
            except KubeError:
                continue

    # ------------------------------------------------------------------ pod creation

    def _register(self, language: str) -> _Pod:
        suffix = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(8))
        name = f"{self.k.kcr_pod_name_prefix}-{language}-{suffix}"
        pod = _Pod(name=name, language=language)
        self._pods[name] = pod  # before the create call: its watch event may come first
        return pod

    def _manifest(self, pod: _Pod, *, kind: str = "pool") -> dict[str, Any]:
        return kube_pods.pod_manifest(
            self.template,
            name=pod.name,
            language=pod.language,
            image=self.k.image(pod.language),
            resources=self.k.resources(pod.language),
            kind=kind,
        )

    def _replenish(self, pool: _Pool) -> None:
        """Start as many pods as the pool lacks (bounded per language; one at a time while the
        pool's pods keep failing, so a broken image or a refusing API costs one attempt per
        back-off). Never blocks."""
        if self._closing or self._nursery is None or pool.retry_scheduled:
            return
        missing = pool.target - len(pool.ready) - pool.starting
        parallel = 1 if pool.failures_in_a_row else self.k.kcr_pod_create_parallel
        room = parallel - pool.starting
        for _ in range(max(0, min(missing, room))):
            pool.starting += 1
            self._nursery.start_soon(self._start_pod, pool)

    async def _start_pod(self, pool: _Pool) -> None:
        failed: tuple[str, float | None] | None = ("not started", None)
        try:
            await self._watch_synced.wait()
            pod = self._register(pool.language)
            failed = await self._bring_up(pod, kind="pool", pool=pool)
        finally:
            pool.starting -= 1
        if failed is None:
            pool.failures_in_a_row = 0
            pool.last_error = pool.waiting = None
            pool.offer(pod)
            # This slot is free again: start the next pod if the pool is still short (a pool larger
            # than KCR_POD_CREATE_PARALLEL fills in waves without waiting for traffic).
            self._replenish(pool)
            return
        reason, retry_after = failed
        if reason != pool.last_error:
            log.warning("pool %s: %s", pool.language, reason)
        pool.last_error, pool.waiting = reason, None
        if pool.retry_scheduled:
            return  # pods that failed together back off together: one retry for all of them
        # Back off (capped, or as long as the API server asked) before the pool tries again.
        pool.failures_in_a_row += 1
        delay = min(30.0, 0.5 * 2 ** min(pool.failures_in_a_row, 6))
        if retry_after is not None:
            delay = max(delay, retry_after)
        pool.retry_scheduled = True
        try:
            await trio.sleep(delay)
        finally:
            pool.retry_scheduled = False
        self._replenish(pool)

    async def _bring_up(self, pod: _Pod, *, kind: str, pool: _Pool | None = None) -> tuple[str, float | None] | None:
        """Create ``pod`` and wait until it is Ready: ``None``, else why not and how long the API
        server asked us to wait. On failure or cancellation a pod that may exist is deleted
        (shielded, bounded); a create the API server refused left nothing to delete."""
        may_exist = ok = False
        try:
            try:
                may_exist = True
                await self.api.create_pod(self._manifest(pod, kind=kind))
            except KubeError as exc:
                may_exist = not (exc.refused or exc.http_status == 429)
                return self._create_error(exc), exc.retry_after
            failure = await self._wait_ready(pod, pool)
            ok = failure is None
            return None if failure is None else (failure, None)
        finally:
            if not ok:
                if may_exist:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                        await self._delete(pod)
                else:
                    self._pods.pop(pod.name, None)

    def _create_error(self, exc: KubeError) -> str:
        if exc.http_status == 403:
            return (f"Kubernetes refused to create an execution pod in namespace {self.api.namespace} "
                    f"(403 Forbidden): {exc}. Check the Role (pods: create), Pod Security admission, "
                    "ResourceQuota and RuntimeClass of that namespace.")
        return f"Creating an execution pod failed: {exc}"

    async def _wait_ready(self, pod: _Pod, pool: _Pool | None) -> str | None:
        """Wait for Ready with two clocks: creation → container started (scheduling and the image
        pull: ``KCR_POD_START_TIMEOUT``), then started → Ready (``KCR_POD_READY_TIMEOUT``). A pod
        that is Unschedulable or whose pull the kubelet is retrying is waited on (its reason shown in
        the pool's status), not deleted and recreated: that would only fight a cluster autoscaler."""
        start_by = trio.current_time() + self.k.kcr_pod_start_timeout
        ready_by: float | None = None
        while not pod.ready:
            if pod.failure:
                return pod.failure
            view = pod.view
            if view is not None and view.started and ready_by is None:
                ready_by = trio.current_time() + self.k.kcr_pod_ready_timeout
            if pool is not None and view is not None and view.waiting and view.waiting != pool.waiting:
                log.warning("pool %s: %s", pool.language, view.waiting)
                pool.waiting = view.waiting
            changed = pod.changed
            with trio.move_on_at(start_by if ready_by is None else ready_by):
                await changed.wait()
                continue
            if ready_by is None:
                why = f" ({view.waiting})" if view is not None and view.waiting else ""
                return f"Execution pod {pod.name} did not start within {self.k.kcr_pod_start_timeout:g}s{why}"
            return (f"Execution pod {pod.name} did not become ready within "
                    f"{self.k.kcr_pod_ready_timeout:g}s of starting")
        return None

    # ------------------------------------------------------------------ the watch

    async def _watch_loop(self) -> None:
        selector = kube_pods.selector(owner_uid=self.owner_uid)
        rv = ""
        failures = 0
        while True:
            try:
                if not rv:
                    items, rv = await self.api.list_pods(selector)
                    seen = set()
                    for obj in items:
                        seen.add(obj["metadata"]["name"])
                        self._observe("MODIFIED", obj)
                    for name, pod in list(self._pods.items()):
                        if name not in seen and pod.view is not None:
                            self._observe_gone(pod)
                    self._watch_synced.set()
                async with self.api.watch(selector, rv) as events:
                    self.watch_connected = True
                    self._watch_error = None
                    failures = 0
                    while (event := await events.next()) is not None:
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                rv = ""  # expired: re-list
                                break
                            raise KubeError(f"watch error: {obj.get('message')}", status=obj.get("code") or 0)
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        self.watch_rv = rv
                        if kind != "BOOKMARK":
                            self._observe(kind, obj)
            except KubeError as exc:
                failures += 1
                if exc.http_status == 410:
                    rv = ""
                if exc.http_status in (401, 403):
                    error = (f"Kubernetes refused to list/watch execution pods in namespace {self.api.namespace} "
                             f"({exc.http_status}): {exc}. The Role must grant list and watch on pods.")
                else:
                    error = f"Watching execution pods failed: {exc}"
                if error != self._watch_error:
                    (log.error if exc.http_status in (401, 403) else log.warning)("%s", error)
                self._watch_error = error
                delay = min(10.0, 0.2 * 2 ** min(failures, 6))
                await trio.sleep(max(delay, exc.retry_after or 0.0))
            finally:
                self.watch_connected = False

    def _observe(self, kind: str | None, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        pod = self._pods.get(name or "")
        if pod is None:
            return  # not ours in this run (left over: swept at start-up)
        if kind == "DELETED":
            self._observe_gone(pod)
            return
        was_ready = pod.ready
        pod.update(kube_pods.view(obj))
        if was_ready and not pod.ready:
            self._drop_if_idle(pod)

    def _observe_gone(self, pod: _Pod) -> None:
        pod.update(None, gone=True)
        self._pods.pop(pod.name, None)
        self._drop_if_idle(pod)

    def _drop_if_idle(self, pod: _Pod) -> None:
        """A warm pod that stopped being usable: forget it, delete it, replace it."""
        pool = self.pools[pod.language]
        if pod in pool.ready:
            pool.ready.remove(pod)
            pool.last_error = pod.failure
            if not pod.gone and self._nursery is not None and not self._closing:
                self._nursery.start_soon(self._delete, pod)
            self._replenish(pool)

    async def _failure_reason(self, pod: _Pod, error: BaseException | str | None) -> str:
        """Why a run on ``pod`` broke: the pod's own status if Kubernetes reports a failure within a
        moment (the watch usually lags a dropped connection by milliseconds), else the error."""
        with trio.move_on_after(3.0):
            await pod.wait_for(lambda p: p.failure is not None)
        if pod.failure:
            return pod.failure
        detail = f": {error}" if error else ""
        return f"Execution pod {pod.name} stopped responding{detail}"

    # ------------------------------------------------------------------ start-up and shutdown

    async def sweep(self) -> int:
        """Delete our variant's pods whose owner is gone (crashed replica) or is us (a previous
        run of this same pod). Returns how many were deleted."""
        items, _ = await self.api.list_pods(kube_pods.selector())
        doomed = []
        judge_owners = self.k.kcr_pod_sweep_orphans and self.owner_is_pod
        live: set[str] | None = None
        for obj in items:
            owner = (obj["metadata"].get("labels") or {}).get(kube_pods.OWNER, "")
            if owner == self.owner_uid:
                doomed.append(obj)
                continue
            if not judge_owners:
                continue  # outside a cluster (or unable to list owners) we cannot tell live from dead
            if live is None:
                try:
                    owners, _ = await self.api.list_pods(namespace=self.k.own_namespace())
                    live = {o["metadata"].get("uid") for o in owners}
                except KubeError as exc:
                    # E.g. no Role to list pods in our own namespace when execution pods run in
                    # another: other replicas' pods are kept, our own leftovers still go.
                    log.warning("orphan sweep: cannot list API pods in namespace %s to tell crashed "
                                "replicas from live ones, keeping their pods: %s", self.k.own_namespace(), exc)
                    judge_owners = False
                    continue
            if owner not in live:
                doomed.append(obj)
        async with trio.open_nursery() as nursery:
            for obj in doomed:
                nursery.start_soon(self._sweep_one, obj["metadata"]["name"])
        if doomed:
            log.info("swept %d orphaned execution pods", len(doomed))
        return len(doomed)

    async def _sweep_later(self, retry_after: float | None) -> None:
        for attempt in range(1, 1000):
            await trio.sleep(max(min(60.0, 2.0 ** attempt), retry_after or 0.0))
            try:
                await self.sweep()
                return
            except KubeError as exc:
                retry_after = exc.retry_after

    async def _sweep_one(self, name: str) -> None:
        try:
            await self.api.delete_pod(name, grace_seconds=0)
        except KubeError as exc:
            log.warning("could not delete orphaned pod %s: %s", name, exc)

    async def _delete_all_ours(self) -> None:
        names = set(self._pods)
        try:
            items, _ = await self.api.list_pods(kube_pods.selector(owner_uid=self.owner_uid))
            names |= {o["metadata"]["name"] for o in items}
        except KubeError as exc:
            log.warning("listing our pods at shutdown failed: %s", exc)
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._sweep_one, name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work until cancelled; then delete our pods (shielded, bounded)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self.sweep()
                except KubeError as exc:  # not fatal: retried in the background
                    log.warning("start-up sweep failed, retrying in the background: %s", exc)
                    nursery.start_soon(self._sweep_later, exc.retry_after)
                nursery.start_soon(self._watch_loop)
                for pool in self.pools.values():
                    self._replenish(pool)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closing = True
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                await self._delete_all_ours()


def _host(ip: str | None) -> str:
    if not ip:
        raise Unavailable("Execution pod has no IP address")
    return f"[{ip}]" if ":" in ip else ip


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
