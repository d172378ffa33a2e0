"""KubeCodeRun's Go runner (``kcr-runner`` pods) on the emulated cluster: the runner double behaves
as the real runner was observed to, and the executor handles each mismatch that used to reach users
(directories stored as files, the silent 120 s clamp, signal deaths with empty stderr)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import kcr_runner_double

from .conftest import NS, executor_for, until

RUNNER = {"kcr_pod_protocol": "kcr-runner", "k8s_image_registry": "aronmuon/kubecoderun", "k8s_image_tag": "3.3.3"}


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[str]:
    """The runner double on its own, with an image-style short cap (MAX_EXECUTION_TIME=5)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wd = tmp_path / "data"
    proc = subprocess.Popen(
        ["/usr/bin/env", "LANGUAGE=py", "MAX_EXECUTION_TIME=5", sys.executable, kcr_runner_double.__file__,
         "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(wd)],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "runner double did not start"
            time.sleep(0.02)
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_runner_double_matches_the_observed_runner(runner: str) -> None:
    with httpx.Client(base_url=runner, timeout=30) as c:
        run = lambda code, timeout=30: c.post("/execute", json={"code": code, "timeout": timeout}).json()
        # stderr only on failure
        ok = run("import sys\nprint('out')\nprint('warning', file=sys.stderr)")
        assert ok["exit_code"] == 0 and ok["stdout"] == "out\n" and ok["stderr"] == ""
        bad = run("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)")
        assert bad["exit_code"] == 3 and bad["stderr"] == "boom\n"
        # silent clamp to MAX_EXECUTION_TIME (5 here) and -1 on the deadline, partial output kept
        slow = run("import time\nprint('partial', flush=True)\ntime.sleep(60)", timeout=30)
        assert slow["exit_code"] == -1 and slow["stdout"] == "partial\n" and slow["execution_time_ms"] < 20000
        # -1 and no stderr on a signal death
        killed = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        assert killed == {**killed, "exit_code": -1, "stderr": ""}
        # 1 MiB stdout cut, no flag
        big = run("import sys\nsys.stdout.write('x' * (3 << 20))")
        assert len(big["stdout"]) == 1 << 20 and set(big) == {"exit_code", "stdout", "stderr", "execution_time_ms"}
        # directories listed as size-0 entries; a directory download is a JSON listing
        run("import os\nos.makedirs('sub', exist_ok=True)\nopen('sub/x.txt', 'w').write('hi')\n"
            "open('index.html', 'w').write('<p>')\nopen('empty.txt', 'w').close()")
        listing = {f["name"]: f for f in c.get("/files").json()["files"]}
        assert listing["sub"]["size"] == 0 and listing["empty.txt"]["size"] == 0 and "mime_type" not in listing["sub"]
        sub = c.get("/files/sub")
        assert sub.json() == {"files": [{"name": "x.txt", "path": "sub/x.txt", "size": 2}]}
        assert "accept-ranges" not in sub.headers
        empty = c.get("/files/empty.txt")
        assert empty.content == b"" and empty.headers["accept-ranges"] == "bytes" and "last-modified" in empty.headers
        # 301 on index.html (Go's ServeFile), served under the trailing-slash form
        redirect = c.get("/files/index.html")
        assert redirect.status_code == 301 and redirect.headers["location"] == "./"
        assert c.get("/files/index.html/").content == b"<p>"


async def test_directories_are_never_output_files(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 1}, **RUNNER) as ex:
        assert await ex.wait_warm(30)
        async with ex.sandbox("py", wait=10) as sb:
            code = ("import os\nos.makedirs('subdir/deeper')\nopen('subdir/x.txt', 'w').write('nested')\n"
                    "open('empty.txt', 'w').close()\nopen('report.txt', 'w').write('top')\n"
                    "open('index.html', 'w').write('<h1>hi</h1>')\n")
            result = await sb.run(code, timeout=20, request_id="dirs")
            assert result.exit_code == 0, result.stderr
            files = {g.name: g.size for g in await sb.generated_files()}
            assert files == {"empty.txt": 0, "report.txt": 3, "index.html": 11}
            for name, expected in (("index.html", b"<h1>hi</h1>"), ("empty.txt", b"")):
                async with sb.open_file(name) as chunks:
                    assert b"".join([c async for c in chunks]) == expected


async def test_runner_cap_is_sent_and_a_higher_limit_is_explained(emulator, kubeconfig):
    emulator.runner_env["MAX_EXECUTION_TIME"] = "1"  # an image built with a 1 s cap
    async with executor_for(kubeconfig, {"py": 1}, kcr_runner_max_execution_time=1, **RUNNER) as ex:
        assert await ex.wait_warm(30)
        async with ex.sandbox("py", wait=10) as sb:
            result = await sb.run("import time\nprint('started', flush=True)\ntime.sleep(30)", timeout=4, request_id="cap")
        assert result.failure is None and result.timed_out and result.exit_code == 124
        assert "timed out after 1 seconds" in result.stderr
        assert "stops programs after 1 s" in result.stderr and "limit of 4 s" in result.stderr


async def test_signal_death_is_explained(emulator, kubeconfig):
    async with executor_for(kubeconfig, {"py": 2}, k8s_memory_limit="256Mi", **RUNNER) as ex:
        assert await ex.wait_warm(30)
        # The program alone dies (the runner survives): the runner says -1 and nothing else.
        async with ex.sandbox("py", wait=10) as sb:
            result = await sb.run("import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
                                  timeout=20, request_id="sig")
        assert result.exit_code == -1 and not result.timed_out and result.failure is None
        assert result.stdout == "before\n"
        assert "killed by a signal" in result.stderr and "limit 256Mi" in result.stderr
        # The whole container is OOM-killed mid-run: the pod's status says so.
        async with ex.sandbox("py", wait=10) as sb:
            name = sb.pod_name
            workdir = emulator.workdir(NS, name)
            async with trio.open_nursery() as nursery:
                outcome = {}

                async def run() -> None:
                    outcome["r"] = await sb.run("import time\nopen('started.txt','w').close()\ntime.sleep(60)",
                                                timeout=60, request_id="oom")

                nursery.start_soon(run)
                await until(lambda: (workdir / "started.txt").exists(), 15, "program running")
                emulator.oom_kill(NS, name)
        result = outcome["r"]
        assert "OOMKilled" in result.stderr and "memory limit 256Mi" in result.stderr and result.exit_code == 137


async def test_exec_through_the_api_stores_no_directory(emulator, kubeconfig, tmp_path):
    """The end-to-end form of the bug: ``/exec`` used to return an output file named ``subdir``
    whose content was the runner's JSON listing."""
    from tests.support.server import TEST_KEY, running_server
    from tests.support.server import make_settings as server_settings

    async with executor_for(kubeconfig, {"py": 1}, **RUNNER) as ex:
        settings = server_settings(tmp_path / "data", kcr_executor="kubernetes", pod_pool_py=1)
        async with running_server(settings, executor=ex) as url, \
                httpx.AsyncClient(base_url=url, headers={"x-api-key": TEST_KEY}, timeout=60) as client:
            assert await ex.wait_warm(30)
            code = "import os\nos.makedirs('subdir')\nopen('subdir/x.txt', 'w').write('nested')\nopen('out.txt', 'w').write('top')\n"
            r = await client.post("/exec", json={"code": code, "lang": "py"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [f["name"] for f in body["files"]] == ["out.txt"]
            stored = await client.get(f"/download/{body['session_id']}/{body['files'][0]['id']}")
            assert stored.content == b"top"
