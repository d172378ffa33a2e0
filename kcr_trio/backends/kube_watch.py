"""What the Kubernetes executor knows about its own pods, learnt from one watch.

**One watch** over our own pods (selector: our variant label + our owner UID) keeps an in-memory
view of every pod we created. Readiness, failures and deletions are all learnt from it; nothing
polls. The watch resumes from its ``resourceVersion`` (BOOKMARKs advance it) and re-lists after a
410. A warm pod that stops being usable (not Ready any more, or gone) is reported to the executor
through ``on_unusable``, which forgets, deletes and replaces it.
"""

from __future__ import annotations

import logging
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import kube_pods
from .kube_adapter import KubeApi, KubeError

log = logging.getLogger("kcr_trio.kubernetes")

__all__ = ["PodTracker", "TrackedPod"]

_NAME_ALPHABET = string.ascii_lowercase + string.digits
FAILURE_GRACE = 3.0  # how long a broken run waits for the pod status to say why


@dataclass(eq=False)
class TrackedPod:
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

    @property
    def exit_code(self) -> int:
        """The container's exit code if it terminated, else -1."""
        return self.view.exit_code if self.view and self.view.exit_code is not None else -1

    async def wait_for(self, predicate: Callable[[TrackedPod], bool]) -> None:
        while not predicate(self):
            await self.changed.wait()

    async def failure_reason(self, error: BaseException | str | None) -> str:
        """Why a run on this pod broke: the pod's own status if Kubernetes reports a failure within
        a moment (the watch usually lags a dropped connection by milliseconds), else the error."""
        with trio.move_on_after(FAILURE_GRACE):
            await self.wait_for(lambda p: p.failure is not None)
        if self.failure:
            return self.failure
        detail = f": {error}" if error else ""
        return f"Execution pod {self.name} stopped responding{detail}"


class PodTracker:
    """The registry of our pods and the watch loop that keeps it current."""

    def __init__(self, api: KubeApi, owner_uid: str, *, name_prefix: str,
                 on_unusable: Callable[[TrackedPod], None]) -> None:
        self.api = api
        self.owner_uid = owner_uid
        self.name_prefix = name_prefix
        self.on_unusable = on_unusable
        self.pods: dict[str, TrackedPod] = {}
        self.synced = trio.Event()  # the first list is in: pods may be created
        self.connected = False
        self.error: str | None = None
        self.rv = ""  # the resourceVersion the watch resumes from (BOOKMARKs advance it)

    def register(self, language: str) -> TrackedPod:
        """A new pod name, tracked before the create call (its watch event may come first)."""
        suffix = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(8))
        pod = TrackedPod(name=f"{self.name_prefix}-{language}-{suffix}", language=language)
        self.pods[pod.name] = pod
        return pod

    def forget(self, pod: TrackedPod) -> None:
        self.pods.pop(pod.name, None)

    def mark_gone(self, pod: TrackedPod) -> None:
        """We deleted it and the API says it no longer exists."""
        pod.update(None, gone=True)
        self.forget(pod)

    async def run(self) -> None:
        """List, then watch, forever; failures back off and are reported in ``error``."""
        selector = kube_pods.selector(owner_uid=self.owner_uid)
        rv = ""
        failures = 0
        while True:
            try:
                if not rv:
                    rv = await self._relist(selector)
                async with self.api.watch(selector, rv) as events:
                    self.connected = True
                    self.error = None
                    failures = 0
                    while (event := await events.next()) is not None:
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                rv = ""  # expired: re-list
                                break
                            raise KubeError(f"watch error: {obj.get('message')}", status=obj.get("code") or 0)
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        self.rv = rv
                        if kind != "BOOKMARK":
                            self._observe(kind, obj)
            except KubeError as exc:
                failures += 1
                if exc.http_status == 410:
                    rv = ""
                self._note_error(exc)
                delay = min(10.0, 0.2 * 2 ** min(failures, 6))
                await trio.sleep(max(delay, exc.retry_after or 0.0))
            finally:
                self.connected = False

    async def _relist(self, selector: str) -> str:
        items, rv = await self.api.list_pods(selector)
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["name"])
            self._observe("MODIFIED", obj)
        for name, pod in list(self.pods.items()):
            if name not in seen and pod.view is not None:
                self._observe_gone(pod)
        self.synced.set()
        return rv

    def _note_error(self, exc: KubeError) -> None:
        if exc.http_status in (401, 403):
            error = (f"Kubernetes refused to list/watch execution pods in namespace {self.api.namespace} "
                     f"({exc.http_status}): {exc}. The Role must grant list and watch on pods.")
        else:
            error = f"Watching execution pods failed: {exc}"
        if error != self.error:
            (log.error if exc.http_status in (401, 403) else log.warning)("%s", error)
        self.error = error

    def _observe(self, kind: str | None, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        pod = self.pods.get(name or "")
        if pod is None:
            return  # not ours in this run (left over: swept at start-up)
        if kind == "DELETED":
            self._observe_gone(pod)
            return
        was_ready = pod.ready
        pod.update(kube_pods.view(obj))
        if was_ready and not pod.ready:
            self.on_unusable(pod)

    def _observe_gone(self, pod: TrackedPod) -> None:
        self.mark_gone(pod)
        self.on_unusable(pod)
