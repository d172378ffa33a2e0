"""Warm pools on the emulated cluster: warm-up, one run per pod, contention, busy answers,
replenishment, cold pods, and the pod template's labels and security settings."""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from kcr_trio.core.errors import Busy, Unavailable

from .conftest import NS, executor_for, ready_pods, until


async def test_pools_warm_up_by_watch_with_kcr_compatible_pods(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 2, "js": 1}) as ex:
        assert (await ex.status())["ready"] is False  # no pod can be ready this early
        assert await ex.wait_warm(30)
        status = await ex.status()
        assert status["ready"] and status["warm"] and status["watch"] == "connected"
        assert status["pools"]["py"]["ready"] == 2 and status["pools"]["js"]["ready"] == 1
        pods = emulator.pods(NS, "kubecoderun.io/variant=trio")
        assert len(pods) == 3
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            labels = meta["labels"]
            lang = labels["kubecoderun.io/language"]
            assert meta["name"].startswith(f"trio-pool-{lang}-")
            assert labels["app.kubernetes.io/managed-by"] == "kubecoderun"
            assert labels["kubecoderun.io/type"] == "pool"
            assert labels["kubecoderun.io/owner-pod-uid"] == ex.owner_uid
            assert "app.kubernetes.io/instance" not in labels  # never behind the API Service
            assert spec["automountServiceAccountToken"] is False
            assert spec["securityContext"]["runAsUser"] == 65532
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            (main,) = spec["containers"]
            assert main["securityContext"]["allowPrivilegeEscalation"] is False
            assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
            assert main["image"] == f"registry.test/kcr-trio-{'python' if lang == 'py' else 'javascript'}:test"
            assert {"name": "data", "mountPath": "/mnt/data"} in main["volumeMounts"]
        # Readiness came from the watch: the executor never polled single pods.
        assert emulator.requests["WATCH", "pods"] >= 1
        assert emulator.requests["GET", "pod"] == 0
    # Leaving the executor deleted its pods.
    await until(lambda: not emulator.pods(NS, "kubecoderun.io/variant=trio"), 15, "pods deleted at shutdown")


async def test_one_run_per_pod_then_deleted_and_replaced(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        names = []
        for i in range(2):
            async with ex.sandbox("py", wait=30) as sb:
                names.append(sb.pod_name)
                result = await sb.run(f"print(6 * 7 + {i})", timeout=20, request_id=f"r{i}")
                assert result.failure is None, result.stderr
                assert result.stdout.strip() == str(42 + i)
            await until(lambda n=sb.pod_name: emulator.pod(NS, n) is None, 15, "used pod deleted")
        assert names[0] != names[1]
        await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool refilled")
        await until(lambda: ex.snapshot()["pools"]["py"]["ready"] == 1, 10, "executor saw the refill")


async def test_contention_serves_everyone_in_turn(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        results: dict[int, tuple[str, str]] = {}

        async def client(i: int) -> None:
            async with ex.sandbox("py", wait=60) as sb:
                r = await sb.run(f"print({i})", timeout=20, request_id=f"c{i}")
                results[i] = (sb.pod_name, r.stdout.strip())

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(client, i)
        assert {i: out for i, (_, out) in results.items()} == {0: "0", 1: "1", 2: "2"}
        assert len({pod for pod, _ in results.values()}) == 3  # never a pod twice


async def test_busy_when_no_pod_frees_up_in_time(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        assert await ex.wait_warm(30)
        # Replacements can no longer start: the registry "lost" the image.
        emulator.failing_images.add("kcr-trio-python")
        async with ex.sandbox("py", wait=30):
            started = time.monotonic()
            with pytest.raises(Busy) as info:
                async with ex.sandbox("py", wait=0.3):
                    pass
            assert time.monotonic() - started < 5
        assert info.value.status == 503
        assert info.value.headers["Retry-After"] == "3"
        # The pool tells why it is not refilling.
        status = await until(
            lambda: (lambda s: s if s["pools"]["py"]["last_error"] else None)(ex.snapshot()),
            30, "pull error reported",
        )
        assert "ImagePullBackOff" in status["pools"]["py"]["last_error"] or "ErrImagePull" in status["pools"]["py"]["last_error"]
        assert "could not be pulled" in status["pools"]["py"]["last_error"]
        assert status["warm"] is False


async def test_replenishment_never_blocks_requests(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 2}) as ex:
        assert await ex.wait_warm(30)
        emulator.failing_images.add("kcr-trio-python")  # replacements will never be ready
        # Both warm pods are handed out at once although their replacements are stuck.
        started = time.monotonic()
        async with ex.sandbox("py", wait=5) as a, ex.sandbox("py", wait=5) as b:
            assert time.monotonic() - started < 2
            assert a.pod_name != b.pod_name
        emulator.failing_images.clear()
        await until(lambda: len(ready_pods(emulator, "py")) == 2, 60, "pool recovered after pull errors")


async def test_unconfigured_language_and_cold_pods(emulator, kubeconfig):
    async with executor_for(kubeconfig, {}) as ex:
        with pytest.raises(Unavailable, match="POD_POOL_PY=0"):
            async with ex.sandbox("py", wait=1):
                pass
    async with executor_for(kubeconfig, {}, kcr_cold_pod_fallback=True) as ex:
        await until(lambda: ex.snapshot()["ready"], 10, "ready with nothing to warm")
        async with ex.sandbox("py", wait=1) as sb:
            pod = emulator.pod(NS, sb.pod_name)
            assert pod["metadata"]["labels"]["kubecoderun.io/type"] == "cold"
            r = await sb.run("print('cold')", timeout=20, request_id="cold")
            assert r.stdout.strip() == "cold"
        await until(lambda: emulator.pod(NS, sb.pod_name) is None, 15, "cold pod deleted")


async def test_runner_protocol_pods(emulator, kubeconfig):
    """KubeCodeRun >= 3 runner images: no env in the pod (the language is baked into the image;
    the emulated kubelet takes it from the language label), same HTTP protocol."""
    async with executor_for(kubeconfig, {"py": 1}, kcr_pod_protocol="kcr-runner",
                            k8s_image_registry="aronmuon/kubecoderun", k8s_image_tag="3.3.3") as ex:
        assert await ex.wait_warm(30)
        (pod,) = emulator.pods(NS, "kubecoderun.io/variant=trio")
        (main,) = pod["spec"]["containers"]
        assert "env" not in main and main["image"] == "aronmuon/kubecoderun-python:3.3.3"
        async with ex.sandbox("py", wait=10) as sb:
            assert (await sb.run("print('runner')", timeout=20, request_id="r")).stdout.strip() == "runner"
        with pytest.raises(Unavailable, match="not available with kcr-runner"):
            async with ex.sandbox("bash", wait=1):
                pass


async def test_cold_pod_with_a_missing_image_fails_clearly(emulator, kubeconfig):
    emulator.failing_images.add("kcr-trio-go")
    async with executor_for(kubeconfig, {}, kcr_cold_pod_fallback=True) as ex:
        with pytest.raises(Unavailable, match="could not be pulled") as info:
            async with ex.sandbox("go", wait=1):
                pass
        assert "registry.test/kcr-trio-go:test" in str(info.value)
        await until(lambda: not emulator.pods(NS, "kubecoderun.io/language=go"), 10, "failed cold pod deleted")


async def test_pool_larger_than_create_parallelism_fills_and_stays_full_without_traffic(emulator, kubeconfig):
    """Pods start at most ``KCR_POD_CREATE_PARALLEL`` at a time; each one that becomes ready frees
    its slot for the next, so the pool reaches its size with no request at all."""
    async with executor_for(kubeconfig, {"py": 5}, kcr_pod_create_parallel=2) as ex:
        assert await ex.wait_warm(60)
        assert len(ready_pods(emulator, "py")) == 5
        assert emulator.requests["CREATE", "pod"] == 5
        # An idle pod dies: the pool is topped up again, still without traffic.
        (victim, *_) = ready_pods(emulator, "py")
        os.kill(emulator.main_pid(NS, victim["metadata"]["name"]), signal.SIGKILL)
        await until(lambda: emulator.pod(NS, victim["metadata"]["name"]) is None, 15, "dead pod deleted")
        await until(lambda: ex.snapshot()["pools"]["py"]["ready"] == 5, 30, "pool full again")
        assert emulator.requests["CREATE", "pod"] == 6
