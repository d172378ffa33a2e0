"""The real API server composed with the Kubernetes executor on the emulated cluster: an /exec runs
in a pod, /ready reflects the warm pools, and a client that hangs up gets its pod deleted."""

from __future__ import annotations

import time

import httpx
import trio

from tests.support.server import TEST_KEY, running_server
from tests.support.server import make_settings as server_settings

from .conftest import NS, executor_for, ready_pods, until

HEADERS = {"x-api-key": TEST_KEY}


async def test_exec_runs_in_a_pod_and_disconnect_reclaims_it(emulator, kubeconfig, tmp_path):
    async with executor_for(kubeconfig, {"py": 1}) as ex:
        settings = server_settings(tmp_path / "data", kcr_executor="kubernetes", pod_pool_py=1)
        async with running_server(settings, executor=ex) as url:
            async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60) as client:
                await until(lambda: ex.snapshot()["ready"], 30, "pools warm")
                ready = await client.get("/ready")
                assert ready.status_code == 200, ready.text

                first = ready_pods(emulator, "py")[0]["metadata"]["name"]
                r = await client.post("/exec", json={"code": "print(1 + 1)", "lang": "py"})
                assert r.status_code == 200, r.text
                assert r.json()["stdout"] == "2\n"
                await until(lambda: emulator.pod(NS, first) is None, 15, "used pod deleted")

                # A client that hangs up mid-run: its pod goes at once, the pool refills.
                await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool refilled")
                name = ready_pods(emulator, "py")[0]["metadata"]["name"]
                code = "import time\nopen('started.txt', 'w').close()\ntime.sleep(60)\n"
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(lambda: client.post("/exec", json={"code": code, "lang": "py"}))
                        await until(lambda: (emulator.workdir(NS, name) or tmp_path / "none").joinpath("started.txt").exists(),
                                    15, "program running")
                        hung_up = time.monotonic()
                        scope.cancel()  # closes the client's connection
                await until(lambda: emulator.pod(NS, name) is None, 10, "pod deleted after hang-up")
                assert time.monotonic() - hung_up < 10
                await until(lambda: len(ready_pods(emulator, "py")) == 1, 30, "pool refilled again")


async def test_ready_means_can_serve_with_per_language_status_and_metric(emulator, kubeconfig, tmp_path):
    """One language whose image cannot be pulled does not keep the replica NotReady: /ready is 200
    with that language's status and reason, and the metric counts it."""
    emulator.failing_images.add("kcr-trio-go")
    async with executor_for(kubeconfig, {"py": 1, "go": 1}) as ex:
        settings = server_settings(tmp_path / "data", kcr_executor="kubernetes", pod_pool_py=1, pod_pool_go=1)
        async with running_server(settings, executor=ex) as url, \
                httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60) as client:
            await until(lambda: ex.snapshot()["ready"], 30, "ready with one broken language")
            ready = await client.get("/ready")
            assert ready.status_code == 200, ready.text
            pools = ready.json()["checks"]["executor"]["pools"]
            assert pools["py"]["status"] == "available" and pools["py"]["reason"] is None
            assert pools["go"]["status"] == "unavailable" and "could not be pulled" in pools["go"]["reason"]
            metrics = (await client.get("/metrics")).text
            assert "kcr_executor_unavailable_languages 1.0" in metrics
            assert 'kcr_pool_available{language="go"} 0.0' in metrics
            assert 'kcr_pool_available{language="py"} 1.0' in metrics
            # The broken language answers clearly; the healthy one runs code.
            r = await client.post("/exec", json={"code": "print(3 * 3)", "lang": "py"})
            assert r.status_code == 200 and r.json()["stdout"] == "9\n"
            # Every language broken: not ready, and the body says why.
            await until(lambda: ex.snapshot()["pools"]["py"]["ready"] == 1, 30, "py refilled")
            emulator.failing_images.add("kcr-trio-python")
            (pod,) = ready_pods(emulator, "py")
            emulator.evict(NS, pod["metadata"]["name"])
            await until(lambda: not ex.snapshot()["ready"], 30, "not ready once nothing can run")
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert "no language can run code" in ready.json()["checks"]["executor"]["reason"]
