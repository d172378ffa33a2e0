"""Bringing one execution pod up (create → Ready) and down (delete, retried in the background).

**Starting pods**: creation → container started is bounded by ``KCR_POD_START_TIMEOUT``
(scheduling, first image pulls), started → Ready by ``KCR_POD_READY_TIMEOUT``. Unschedulable pods
and image pulls the kubelet retries are waited on with their reason shown; permanent errors give
the pod up at once. A create the API refused (403 from RBAC, Pod Security or a quota; 429) is not
followed by a DELETE: nothing was created. Whether and when to try again is the pool's decision
(:mod:`.warm_pool`), not this module's.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from . import kube_pods
from .kube_adapter import KubeApi, KubeError
from .kube_settings import KubernetesSettings
from .kube_watch import PodTracker, TrackedPod
from .warm_pool import WarmPool

log = logging.getLogger("kcr_trio.kubernetes")

__all__ = ["DELETE_RETRY_DELAYS", "PodLifecycle", "StartFailure"]

DELETE_RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30)  # a failed delete is retried in the background
StartFailure = tuple[str, float | None]  # why a pod did not come up, and the API's Retry-After


class PodLifecycle:
    """Creates, waits for and deletes pods; the tracker learns their state from the watch."""

    def __init__(self, api: KubeApi, k: KubernetesSettings, template: kube_pods.PodTemplate,
                 tracker: PodTracker) -> None:
        self.api = api
        self.k = k
        self.template = template
        self.tracker = tracker
        # Set while the executor runs (and cleared when it closes): background delete retries.
        self.nursery: trio.Nursery | None = None

    def manifest(self, pod: TrackedPod, *, kind: str = "pool") -> dict[str, Any]:
        return kube_pods.pod_manifest(
            self.template,
            name=pod.name,
            language=pod.language,
            image=self.k.image(pod.language),
            resources=self.k.resources(pod.language),
            kind=kind,
        )

    async def bring_up(self, pod: TrackedPod, *, kind: str,
                       pool: WarmPool[TrackedPod] | None = None) -> StartFailure | None:
        """Create ``pod`` and wait until it is Ready: ``None``, else why not and how long the API
        server asked us to wait. On failure or cancellation a pod that may exist is deleted
        (shielded, bounded); a create the API server refused left nothing to delete."""
        may_exist = ok = False
        try:
            try:
                may_exist = True
                await self.api.create_pod(self.manifest(pod, kind=kind))
            except KubeError as exc:
                may_exist = not (exc.refused or exc.http_status == 429)
                return self.create_error(exc), exc.retry_after
            failure = await self.wait_ready(pod, pool)
            ok = failure is None
            return None if failure is None else (failure, None)
        finally:
            if not ok:
                if may_exist:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.k.kcr_k8s_cleanup_timeout):
                        await self.delete(pod)
                else:
                    self.tracker.forget(pod)

    def create_error(self, exc: KubeError) -> str:
        if exc.http_status == 403:
            return (f"Kubernetes refused to create an execution pod in namespace {self.api.namespace} "
                    f"(403 Forbidden): {exc}. Check the Role (pods: create), Pod Security admission, "
                    "ResourceQuota and RuntimeClass of that namespace.")
        return f"Creating an execution pod failed: {exc}"

    async def wait_ready(self, pod: TrackedPod, pool: WarmPool[TrackedPod] | None) -> str | None:
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
            if pool is not None and view is not None and view.waiting and pool.note_start_waiting(view.waiting):
                log.warning("pool %s: %s", pool.language, view.waiting)
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

    async def delete(self, pod: TrackedPod) -> None:
        """Delete now (callers shield and bound this); a failed call is retried in the background."""
        if pod.gone:
            self.tracker.forget(pod)
            return
        try:
            gone = not await self.api.delete_pod(pod.name, grace_seconds=self.k.kcr_pod_delete_grace)
        except KubeError as exc:
            log.warning("deleting pod %s failed (%s); retrying in the background", pod.name, exc)
            if self.nursery is not None:
                self.nursery.start_soon(self._delete_later, pod)
            return
        if gone:
            self.tracker.mark_gone(pod)

    async def _delete_later(self, pod: TrackedPod) -> None:
        for delay in DELETE_RETRY_DELAYS:
            await trio.sleep(delay)
            try:
                if not await self.api.delete_pod(pod.name, grace_seconds=0):
                    self.tracker.mark_gone(pod)
                return
            except KubeError:
                continue
