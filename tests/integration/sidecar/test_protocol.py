"""A client written from KubeCodeRun's pod protocol (kubecoderun-internals.md §2) against our sidecar.

Field names and status codes are KubeCodeRun's; our extra fields must not disturb such a client.
"""

from __future__ import annotations

import httpx
import trio

from tests.support.sidecar import running_sidecar

KCR_EXECUTE_KEYS = {"exit_code", "stdout", "stderr", "execution_time_ms", "state", "state_errors"}


async def test_execute_health_ready_and_kcr_fields() -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "healthy" and health["language"] == "py"
        assert health["working_dir"] == sc.working_dir and "timestamp" in health
        assert (await client.get("/ready")).json() == {"status": "ready"}

        # KubeCodeRun's API sends exactly these fields (initial_state/capture_state are ignored).
        body = {"code": "import sys\nprint('out')\nprint('warn', file=sys.stderr)", "timeout": 30,
                "working_dir": "/mnt/data", "initial_state": None, "capture_state": False}
        resp = await client.post("/execute", json=body, headers={"X-Request-ID": "req-42"})
        assert resp.status_code == 200
        data = resp.json()
        assert KCR_EXECUTE_KEYS <= set(data)
        assert data["exit_code"] == 0 and data["stdout"] == "out\n"
        assert data["stderr"] == "warn\n"  # stderr is returned on exit 0 too (the Go runner drops it)
        assert data["state"] is None and data["state_errors"] is None
        assert data["timed_out"] is False and data["killed"] is None
        assert data["request_id"] == "req-42"
        assert isinstance(data["execution_time_ms"], (int, float))

        resp = await client.post("/execute", json={"code": "raise SystemExit(3)", "timeout": 5})
        assert resp.json()["exit_code"] == 3


async def test_validation_errors_are_422() -> None:
    async with running_sidecar("py", "--max-execution-time", "300") as sc, \
            httpx.AsyncClient(base_url=sc.url) as client:
        for bad in ({"code": "print(1)", "timeout": 0}, {"code": "print(1)", "timeout": 301},
                    {"code": "print(1)", "timeout": "x"}, {"timeout": 5}, {"code": 5, "timeout": 5}):
            resp = await client.post("/execute", json=bad)
            assert resp.status_code == 422, bad
            assert isinstance(resp.json()["detail"], list)
        resp = await client.post("/execute", content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 422
        # More than KubeCodeRun's 120 s cap is accepted up to our configured maximum.
        resp = await client.post("/execute", json={"code": "print(1)", "timeout": 300})
        assert resp.status_code == 200 and resp.json()["stdout"] == "1\n"
        assert (await client.get("/nope")).status_code == 404
        assert (await client.put("/execute")).status_code == 405


async def test_concurrent_execute_is_409() -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        first: dict = {}

        async def slow() -> None:
            r = await client.post("/execute", json={"code": "import time\ntime.sleep(2)\nprint('done')",
                                                    "timeout": 10})
            first["resp"] = r

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            with trio.fail_after(5):
                while not (await client.get("/health")).json()["busy"]:
                    await trio.sleep(0.01)
            second = await client.post("/execute", json={"code": "print(2)", "timeout": 5})
            assert second.status_code == 409
        assert first["resp"].json()["stdout"] == "done\n"
        # and it serves again afterwards
        again = await client.post("/execute", json={"code": "print(2)", "timeout": 5})
        assert again.json()["stdout"] == "2\n"


async def test_graceful_stop_leaves_no_temp_dirs_and_sigkill_leftovers_are_swept() -> None:
    import os
    import shutil
    import signal

    from tests.support.sidecar import public_tmpdir

    root = public_tmpdir()
    try:
        async with running_sidecar("py", root=root) as sc, httpx.AsyncClient(base_url=sc.url) as client:
            assert (await client.post("/execute", json={"code": "print(1)", "timeout": 5})).status_code == 200
            assert len(os.listdir(os.path.join(root, "tmp"))) == 1  # this sidecar's own dir
        assert os.listdir(os.path.join(root, "tmp")) == []  # SIGTERM: removed on the way out
        async with running_sidecar("py", root=root) as sc:
            sc.process.send_signal(signal.SIGKILL)  # no chance to clean up
            await sc.process.wait()
        assert len(os.listdir(os.path.join(root, "tmp"))) == 1
        async with running_sidecar("py", root=root) as sc:  # the next one sweeps the dead one's dir
            assert len(os.listdir(os.path.join(root, "tmp"))) == 1
            assert os.path.basename(os.listdir(os.path.join(root, "tmp"))[0]).startswith(f"kcr-sidecar-{sc.pid}-")
    finally:
        shutil.rmtree(root, ignore_errors=True)
