"""API-server and scheduling faults as a real cluster produces them, reproduced by the emulator:
403 from RBAC/admission, 429/5xx with Retry-After, Unschedulable pods, transient and slow image
pulls, watch BOOKMARKs. Each is handled, and its reason reaches ``status()`` (``/ready``) and the log."""

from __future__ import annotations

import logging

import pytest
import trio

from .conftest import NS, executor_for, until
from .test_failures import _exec_pod

POD_SECURITY = ('pods "x" is forbidden: violates PodSecurity "restricted:latest": seccompProfile '
                '(pod or container "main" must set securityContext.seccompProfile.type)')
RBAC_WATCH = ('pods is forbidden: User "system:serviceaccount:kcr:trio" cannot watch resource "pods" '
              'in API group "" in the namespace "kcr"')


def pool_status(ex, lang="py"):
    return ex.snapshot()["pools"].get(lang, {})


def reason_with(ex, text):
    """The snapshot once its top-level reason mentions ``text``, else None."""
    snap = ex.snapshot()
    return snap if snap["reason"] and text in snap["reason"] else None


def pool_in(ex, status, lang="py"):
    pool = pool_status(ex, lang)
    return pool if pool.get("status") == status else None


async def test_forbidden_create_backs_off_without_deletes_and_says_why(emulator, kubeconfig, caplog):
    emulator.inject("create", 403, POD_SECURITY, namespace=NS)
    async with executor_for(kubeconfig, {"py": 3}) as ex:
        await until(lambda: len(emulator.calls_of("create")) >= 5, 20, "creates retried")
        status = ex.snapshot()
        assert status["ready"] is False and status["unavailable_languages"] == 1
        py = status["pools"]["py"]
        assert py["status"] == "unavailable" and "403 Forbidden" in py["reason"] and "PodSecurity" in py["reason"]
        assert "Check the Role" in py["reason"] and "no language can run code" in status["reason"]
        assert any("PodSecurity" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        # Nothing was created, so nothing is deleted.
        assert emulator.calls_of("delete") == []
        # After the first batch, one attempt per back-off, each wait longer than the last.
        times = [t for t, *_ in emulator.calls_of("create")]
        retries = times[3:]
        gaps = [b - a for a, b in zip([times[2], *retries], retries)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
        # The policy is fixed: the pool fills.
        emulator.clear_faults()
        await until(lambda: ex.snapshot()["ready"], 30, "ready after the policy is fixed")
        assert await ex.wait_warm(30) and pool_status(ex)["status"] == "available"
        assert pool_status(ex)["reason"] is None


async def test_retry_after_is_honoured_for_list_and_create(emulator, kubeconfig):
    emulator.inject("list", 503, "the server is currently unable to handle the request", times=2, retry_after=2)
    emulator.inject("create", 429, "Too many requests, please try again later.", times=1, retry_after=2)
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(60)
        lists = emulator.calls_of("list")
        assert [c[3] for c in lists[:2]] == [503, 503]  # the start-up sweep's and the watch's
        first_failure = lists[0][0]
        assert all(t - first_failure >= 1.9 for t, _, _, code in lists if code == 200)
        creates = emulator.calls_of("create")
        assert [c[3] for c in creates] == [429, 201]
        assert creates[1][0] - creates[0][0] >= 1.9
        assert emulator.calls_of("delete") == []  # a 429 created nothing


@pytest.mark.parametrize("verb", ["list", "watch"])
async def test_forbidden_list_or_watch_surfaces_the_reason(emulator, kubeconfig, caplog, verb):
    emulator.inject(verb, 403, RBAC_WATCH.replace("watch", verb), namespace=NS)
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        status = await until(lambda: reason_with(ex, "403"), 15, "reason reported")
        assert status["ready"] is False and "The Role must grant list and watch on pods" in status["reason"]
        assert f"cannot {verb} resource" in status["reason"]
        assert status["pools"]["py"]["status"] in ("unavailable", "warming")
        if verb == "watch":  # the pod list worked: the language itself says why it cannot serve
            assert "403" in status["pools"]["py"]["reason"]
        assert any(r.levelno == logging.ERROR and "403" in r.getMessage() for r in caplog.records)
        emulator.clear_faults()
        assert await ex.wait_warm(30)
        await until(lambda: ex.snapshot()["ready"], 15, "ready once allowed")


async def test_orphan_sweep_forbidden_in_own_namespace_still_removes_own_leftovers(emulator, kubeconfig):
    """KubeCodeRun-style split: execution pods in one namespace, the API in another whose pods we
    may not list. Other replicas' pods are kept; our own leftovers still go."""
    emulator.namespaces.add("api")
    me = emulator.add_pod("api", {"metadata": {"name": "trio-api-me"}, "spec": {"containers": [{"name": "api", "image": "api"}]}})
    emulator.add_pod(NS, _exec_pod("trio-pool-py-peer", "0f0e0d0c-0000-4000-8000-000000000001"))  # listed first
    emulator.add_pod(NS, _exec_pod("trio-pool-py-mine-old", me["metadata"]["uid"]))
    emulator.inject("list", 403, 'pods is forbidden: cannot list resource "pods" in the namespace "api"', namespace="api")
    async with executor_for(kubeconfig, {"py": 1}, kcr_pod_owner_uid=me["metadata"]["uid"], pod_namespace="api") as ex:
        await until(lambda: emulator.pod(NS, "trio-pool-py-mine-old") is None, 10, "own leftover swept")
        assert emulator.pod(NS, "trio-pool-py-peer") is not None
        assert await ex.wait_warm(30)


async def test_unschedulable_pods_wait_with_the_schedulers_message(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 2}, k8s_pod_node_selector="pool=sandboxes") as ex:
        py = await until(lambda: pool_in(ex, "unavailable"), 15, "unschedulable reported")
        assert "cannot be scheduled (Unschedulable)" in py["reason"] and "didn't match Pod's node affinity/selector" in py["reason"]
        assert ex.snapshot()["ready"] is False
        await trio.sleep(0.5)  # let a naive executor delete and recreate
        assert len(emulator.calls_of("create")) == 2 and emulator.calls_of("delete") == []
        emulator.node_labels["pool"] = "sandboxes"  # the autoscaler added a matching node
        assert await ex.wait_warm(30)
        assert len(emulator.calls_of("create")) == 2 and emulator.calls_of("delete") == []
        assert pool_status(ex)["status"] == "available"


async def test_unschedulable_pods_are_replaced_boundedly_after_the_start_timeout(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 2}, k8s_pod_node_selector="pool=none", kcr_pod_start_timeout=1) as ex:
        await until(lambda: len(emulator.calls_of("create")) >= 4, 20, "replacements after the start timeout")
        py = pool_status(ex)
        assert "did not start within 1s" in py["last_error"] and "Unschedulable" in py["last_error"]
        times = [t for t, *_ in emulator.calls_of("create")]
        # Two at first; after they time out, one at a time, backed off.
        assert times[1] - times[0] < 1.0 and times[2] - times[1] >= 1.9 and times[3] - times[2] >= 1.9


async def test_transient_pull_errors_are_retried_on_the_same_pod(emulator, kubeconfig):
    emulator.flaky_images["kcr-trio-python"] = 3
    seen: list[str] = []
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        with trio.move_on_after(30):
            while not ex.snapshot()["warm"]:
                reason = pool_status(ex).get("reason")
                if reason and reason not in seen:
                    seen.append(reason)
                await trio.sleep(0.02)
        assert ex.snapshot()["warm"]
        assert any("retrying its image pull" in r and "i/o timeout" in r for r in seen), seen
        assert len(emulator.calls_of("create")) == 1 and emulator.calls_of("delete") == []


async def test_slow_first_pull_is_not_cut_by_the_ready_timeout(emulator, kubeconfig):
    """A multi-GB first pull takes longer than starting a container: it counts against
    KCR_POD_START_TIMEOUT, not KCR_POD_READY_TIMEOUT."""
    emulator.pull_delays["kcr-trio-python"] = 6
    async with executor_for(kubeconfig, {"py": 1}, kcr_pod_ready_timeout=5, kcr_pod_start_timeout=60) as ex:
        assert await ex.wait_warm(30)
        assert len(emulator.calls_of("create")) == 1 and emulator.calls_of("delete") == []


async def test_bookmarks_keep_the_watch_resumable_after_compaction(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        # Activity the watch does not see (other pods) moves the resourceVersion on.
        emulator.add_pod(NS, {"metadata": {"name": "unrelated", "labels": {"app": "other"}},
                              "spec": {"containers": [{"name": "c", "image": "x"}]}})
        await until(lambda: (emulator.pod(NS, "unrelated") or {}).get("status", {}).get("phase") == "Running",
                    10, "unrelated pod running")
        assert emulator.send_bookmarks() >= 1
        target = str(emulator._rv)
        await until(lambda: ex.watch_rv == target, 10, "bookmark applied")
        # Compaction forgets everything before now; a watch resuming from the bookmark is fine.
        emulator.compact()
        lists_before = emulator.requests["LIST", "pods"]
        watches_before = emulator.requests["WATCH", "pods"]
        emulator.drop_watches()
        await until(lambda: emulator.requests["WATCH", "pods"] > watches_before, 10, "watch resumed")
        await until(lambda: ex.snapshot()["watch"] == "connected", 10, "connected")
        assert emulator.requests["LIST", "pods"] == lists_before  # no 410, no re-list


async def test_watch_cut_mid_event_resumes_without_relisting(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        lists_before = emulator.requests["LIST", "pods"]
        watches_before = emulator.requests["WATCH", "pods"]
        assert emulator.drop_watches(abrupt=True) >= 1
        await until(lambda: emulator.requests["WATCH", "pods"] > watches_before, 15, "watch resumed")
        await until(lambda: ex.snapshot()["watch"] == "connected", 10, "connected")
        assert emulator.requests["LIST", "pods"] == lists_before
        # Still sees what happens: a run on the warm pod, its deletion, the refill.
        async with ex.sandbox("py", wait=10) as sb:
            assert (await sb.run("print('ok')", timeout=20, request_id="cut")).stdout == "ok\n"
        await until(lambda: ex.snapshot()["pools"]["py"]["ready"] == 1, 30, "refilled")
