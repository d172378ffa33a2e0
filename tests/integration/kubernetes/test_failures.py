"""Disconnects, dying pods, crashed replicas and cancelled watches on the emulated cluster."""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from kcr_trio.backends.kube_adapter import KubeApi
from kcr_trio.backends.kubernetes_executor import open_kubernetes_executor

from .conftest import NS, alive, descendants, executor_for, make_settings, ready_pods, until

# Marks its start with a file in the working directory (the pod's /mnt/data), then blocks.
LONG = "import time\nopen('started.txt', 'w').close()\ntime.sleep(60)\n"


def program_started(emulator, name: str) -> bool:
    workdir = emulator.workdir(NS, name)
    return bool(workdir and (workdir / "started.txt").exists())


async def test_client_disconnect_kills_run_and_deletes_pod(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        user_pids: set[int] = set()
        cancelled_at = 0.0
        with trio.CancelScope() as request:  # the request scope a client disconnect cancels
            async with ex.sandbox("py", wait=10) as sb:
                name = sb.pod_name
                main = emulator.main_pid(NS, name)

                async def disconnect_once_running() -> None:
                    nonlocal user_pids, cancelled_at
                    await until(lambda: program_started(emulator, name), 15, "program running")
                    user_pids = descendants(main)
                    assert user_pids
                    cancelled_at = time.monotonic()
                    request.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(disconnect_once_running)
                    await sb.run(LONG, timeout=60, request_id="gone")
        assert request.cancelled_caught
        # The pod is deleted at once, the program and the sidecar die with it.
        await until(lambda: emulator.pod(NS, name) is None, 10, "pod deleted after disconnect")
        assert time.monotonic() - cancelled_at < 10
        await until(lambda: not any(alive(p) for p in user_pids | {main}), 10, "processes gone")
        # ... and the pool refills.
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool refilled")
        assert ex.snapshot()["pools"]["py"]["in_use"] == 0


async def _run_and_inject(emulator, ex, inject):
    async with ex.sandbox("py", wait=10) as sb:
        name = sb.pod_name
        main = emulator.main_pid(NS, name)
        result = None

        async def run() -> None:
            nonlocal result
            result = await sb.run(LONG, timeout=60, request_id="dies")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await until(lambda: program_started(emulator, name), 15, "program running")
            started = time.monotonic()
            inject(name, main)
        assert time.monotonic() - started < 10
    return result, name


async def test_sidecar_killed_mid_run_gives_clear_error_and_pool_recovers(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        result, name = await _run_and_inject(emulator, ex, lambda name, pid: os.kill(pid, signal.SIGKILL))
        assert result.failure and result.failure == result.stderr
        assert name in result.failure and "killed by signal 9" in result.failure
        assert result.exit_code == 137
        await until(lambda: emulator.pod(NS, name) is None, 10, "dead pod deleted")
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool recovered")
        async with ex.sandbox("py", wait=10) as sb:
            assert (await sb.run("print('fine')", timeout=20, request_id="after")).stdout.strip() == "fine"


async def test_oom_killed_pod_is_reported(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}, k8s_memory_limit="256Mi") as ex:
        assert await ex.wait_warm(30)
        result, _name = await _run_and_inject(emulator, ex, lambda name, pid: emulator.oom_kill(NS, name))
        assert "OOMKilled" in result.failure and "memory limit 256Mi" in result.failure
        assert result.stderr == result.failure and result.exit_code == 137


async def test_evicted_pod_is_reported(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        result, _name = await _run_and_inject(emulator, ex, lambda name, pid: emulator.evict(NS, name))
        assert "evicted" in result.failure and "low on resource" in result.failure
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool recovered")


async def test_idle_pod_that_dies_is_replaced(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        (pod,) = ready_pods(emulator, "py")
        os.kill(emulator.main_pid(NS, pod["metadata"]["name"]), signal.SIGKILL)
        await until(lambda: emulator.pod(NS, pod["metadata"]["name"]) is None, 10, "dead idle pod deleted")
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "replaced")
        async with ex.sandbox("py", wait=10) as sb:
            assert sb.pod_name != pod["metadata"]["name"]


def _exec_pod(name: str, owner: str, *, variant: bool = True) -> dict:
    labels = {
        "app.kubernetes.io/managed-by": "kubecoderun",
        "kubecoderun.io/type": "pool",
        "kubecoderun.io/language": "py",
        "kubecoderun.io/owner-pod-uid": owner,
    }
    if variant:
        labels["kubecoderun.io/variant"] = "trio"
    return {"metadata": {"name": name, "labels": labels}, "spec": {"containers": [{"name": "main", "image": "x"}]}}


async def test_startup_sweeps_crashed_replicas_and_own_leftovers(emulator, kubeconfig):
    me = emulator.add_pod(NS, {"metadata": {"name": "trio-api-me"}, "spec": {"containers": [{"name": "api", "image": "api"}]}})
    peer = emulator.add_pod(NS, {"metadata": {"name": "trio-api-peer"}, "spec": {"containers": [{"name": "api", "image": "api"}]}})
    my_uid, peer_uid = me["metadata"]["uid"], peer["metadata"]["uid"]
    emulator.add_pod(NS, _exec_pod("trio-pool-py-crashed", "0f0e0d0c-dead-4000-8000-000000000000"))
    emulator.add_pod(NS, _exec_pod("trio-pool-py-mine-old", my_uid))  # previous run of this pod
    emulator.add_pod(NS, _exec_pod("trio-pool-py-peer", peer_uid))  # a live replica's: kept
    emulator.add_pod(NS, _exec_pod("pool-py-kcr", "", variant=False))  # KubeCodeRun's own: kept
    async with executor_for(kubeconfig, {}, kcr_pod_owner_uid=my_uid, pod_namespace=NS) as ex:
        assert ex.owner_is_pod
        await until(lambda: emulator.pod(NS, "trio-pool-py-crashed") is None, 10, "crashed replica's pod swept")
        await until(lambda: emulator.pod(NS, "trio-pool-py-mine-old") is None, 10, "own leftover swept")
        assert emulator.pod(NS, "trio-pool-py-peer") is not None
        assert emulator.pod(NS, "pool-py-kcr") is not None


async def test_cancelled_watch_stops_within_milliseconds(emulator, kubeconfig):
    api = await KubeApi.connect(str(kubeconfig), NS)
    try:
        _, rv = await api.list_pods("app=none")
        async with api.watch("app=none", rv) as events:
            with trio.move_on_after(0.2) as scope:
                await events.next()  # no event will ever come
            stopped = time.monotonic()
        assert scope.cancelled_caught
        assert time.monotonic() - stopped < 0.5
    finally:
        api.close()


async def test_executor_shutdown_is_prompt_and_deletes_its_pods(emulator, kubeconfig):
    settings, ks = make_settings(kubeconfig, {"py": 2})

    async with open_kubernetes_executor(settings, ks) as ex:
        assert await ex.wait_warm(30)
        left_at = time.monotonic()
    assert time.monotonic() - left_at < 5  # the watch thread did not hold shutdown up
    await until(lambda: not emulator.pods(NS, "kubecoderun.io/variant=trio"), 10, "pods deleted")


async def test_watch_resumes_after_drop_and_relists_after_410(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        lists_before = emulator.requests["LIST", "pods"]
        watches_before = emulator.requests["WATCH", "pods"]
        assert emulator.drop_watches() >= 1
        await until(lambda: emulator.requests["WATCH", "pods"] > watches_before, 10, "watch resumed")
        assert emulator.requests["LIST", "pods"] == lists_before  # resumed from its resourceVersion
        emulator.drop_watches(compact=True)
        await until(lambda: emulator.requests["LIST", "pods"] > lists_before, 10, "re-listed after 410")
        await until(lambda: ex.snapshot()["watch"] == "connected", 10, "watch connected again")
        # Still sees what happens: an idle pod that dies is replaced.
        (pod,) = ready_pods(emulator, "py")
        os.kill(emulator.main_pid(NS, pod["metadata"]["name"]), signal.SIGKILL)
        await until(lambda: emulator.pod(NS, pod["metadata"]["name"]) is None, 10, "dead pod deleted")
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "replaced")


async def test_unreachable_api_is_reported_not_fatal(tmp_path):
    """No API server at the configured address: the executor still opens (the watch keeps
    retrying), reports why it is not ready, answers Busy, and shuts down promptly."""
    import socket

    from kcr_trio.core.errors import Busy

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
        f' "clusters": [{{"name": "k", "cluster": {{"server": "http://127.0.0.1:{port}"}}}}],'
        ' "users": [{"name": "u", "user": {"token": "t"}}],'
        ' "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}'
    )
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        status = await until(lambda: (lambda s: s if s["watch_error"] else None)(ex.snapshot()), 15, "error reported")
        assert "unreachable" in status["watch_error"] and status["ready"] is False
        with pytest.raises(Busy):
            async with ex.sandbox("py", wait=0.2):
                pass
        left = time.monotonic()
    assert time.monotonic() - left < 5
