"""Pods left behind: swept at start-up, and ours deleted at shutdown.

**Start-up sweep**: pods of our variant whose owner (an API replica's pod UID) no longer exists —
a crashed replica — and pods carrying our own UID from an earlier run of this same pod (a container
restart) are deleted before warming up. If the API pods cannot be listed, only our own leftovers
go; a failed sweep is retried in the background (:meth:`Sweeper.sweep_later`).

**Shutdown**: every pod with our owner UID (the ones we track, and any the API lists) is deleted;
the executor shields and bounds the call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from . import kube_pods
from .kube_adapter import KubeApi, KubeError
from .kube_settings import KubernetesSettings

log = logging.getLogger("kcr_trio.kubernetes")

__all__ = ["Sweeper"]


class Sweeper:
    def __init__(self, api: KubeApi, k: KubernetesSettings, *, owner_uid: str, owner_is_pod: bool) -> None:
        self.api = api
        self.k = k
        self.owner_uid = owner_uid
        self.owner_is_pod = owner_is_pod  # our UID is a real pod's (downward API), not a random one

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
        await self._delete_all(obj["metadata"]["name"] for obj in doomed)
        if doomed:
            log.info("swept %d orphaned execution pods", len(doomed))
        return len(doomed)

    async def sweep_later(self, retry_after: float | None) -> None:
        """Retry a failed start-up sweep in the background, backing off (up to a minute)."""
        for attempt in range(1, 1000):
            await trio.sleep(max(min(60.0, 2.0 ** attempt), retry_after or 0.0))
            try:
                await self.sweep()
                return
            except KubeError as exc:
                retry_after = exc.retry_after

    async def delete_all_ours(self, known: Iterable[str]) -> None:
        """Delete the pods we track (``known``) and any other pod carrying our owner UID."""
        names = set(known)
        try:
            items, _ = await self.api.list_pods(kube_pods.selector(owner_uid=self.owner_uid))
            names |= {o["metadata"]["name"] for o in items}
        except KubeError as exc:
            log.warning("listing our pods at shutdown failed: %s", exc)
        await self._delete_all(names)

    async def _delete_all(self, names: Iterable[str]) -> None:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._delete_one, name)

    async def _delete_one(self, name: str) -> None:
        try:
            await self.api.delete_pod(name, grace_seconds=0)
        except KubeError as exc:
            log.warning("could not delete orphaned pod %s: %s", name, exc)
