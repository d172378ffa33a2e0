"""Each limit is enforced, reported, and leaves a sidecar that keeps serving with nothing left behind."""

from __future__ import annotations

import httpx
import pytest

from tests.support.sidecar import Sidecar, running_sidecar, wait_until


async def run(client: httpx.AsyncClient, code: str, timeout: float = 10) -> dict:
    resp = await client.post("/execute", json={"code": code, "timeout": timeout})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def assert_still_serving(sc: Sidecar, client: httpx.AsyncClient) -> None:
    """No user process of the finished run survives (only a fresh idle pre-warm may exist), and
    the sidecar runs the next program normally."""
    assert await wait_until(lambda: len(sc.user_processes()) <= 1, timeout=5), sc.user_processes()
    ok = await run(client, "print('still serving')")
    assert ok["exit_code"] == 0 and ok["stdout"] == "still serving\n", (ok["stdout"], ok["stderr"])


async def test_timeout_keeps_partial_output_and_says_so() -> None:
    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        res = await run(client, "print('before', flush=True)\nwhile True:\n    pass", timeout=1)
        assert res["timed_out"] is True and res["exit_code"] == 124 and res["killed"] == "timeout"
        assert res["stdout"] == "before\n"
        assert res["stderr"].endswith("Execution timed out after 1 seconds")
        await assert_still_serving(sc, client)


async def test_output_cap_marks_truncation_and_flood_is_stopped() -> None:
    async with running_sidecar("py", "--max-output-size", "10000", "--output-kill-factor", "50") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        res = await run(client, "import sys\nsys.stdout.write('x' * 30000)\nprint('tail', file=sys.stderr)")
        assert res["exit_code"] == 0 and res["stdout_truncated"] is True
        assert res["stdout"] == "x" * 10000 + "\n[Output truncated - size limit exceeded]"
        assert res["stderr"] == "tail\n" and res["stderr_truncated"] is False
        # An endless flood is stopped once it passes kill factor x cap, long before the timeout.
        res = await run(client, "while True:\n    print('y' * 1000)", timeout=60)
        assert res["killed"] == "output" and res["timed_out"] is False
        assert len(res["stdout"]) < 10100 and res["stdout_truncated"] is True
        assert "output limit exceeded" in res["stderr"]
        await assert_still_serving(sc, client)


async def test_infinite_loop_is_contained() -> None:
    async with running_sidecar("bash") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        res = await run(client, "while :; do :; done", timeout=1)
        assert res["timed_out"] is True and res["exit_code"] == 124
        await assert_still_serving_bash(sc, client)


async def assert_still_serving_bash(sc: Sidecar, client: httpx.AsyncClient) -> None:
    assert await wait_until(lambda: len(sc.user_processes()) <= 1, timeout=5), sc.user_processes()
    ok = await run(client, "echo still serving")
    assert ok["exit_code"] == 0 and ok["stdout"] == "still serving\n", (ok["stdout"], ok["stderr"])


async def test_fork_bomb_is_contained() -> None:
    async with running_sidecar("py", "--max-pids", "32") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        # Fork until the kernel says no: RLIMIT_NPROC stops it at the configured budget, and the
        # children left sleeping are killed when the program returns.
        code = ("import os, time\nkids = 0\ntry:\n    while kids < 10000:\n        if os.fork() == 0:\n"
                "            time.sleep(120)\n            os._exit(0)\n        kids += 1\n"
                "except OSError as exc:\n    print('stopped after', kids, exc.errno)")
        res = await run(client, code)
        words = res["stdout"].split()
        assert words[:2] == ["stopped", "after"] and int(words[2]) <= 32 and words[3] == "11"
        await assert_still_serving(sc, client)
    async with running_sidecar("bash", "--max-pids", "32") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        # The classic bomb keeps the script alive until the timeout; the swarm dies with it.
        res = await run(client, ":(){ :|:& };:\nsleep 30", timeout=2)
        assert res["timed_out"] is True and res["exit_code"] == 124
        assert "Resource temporarily unavailable" in res["stderr"]
        await assert_still_serving_bash(sc, client)


async def test_memory_bomb_is_contained() -> None:
    async with running_sidecar("py", "--max-memory-mb", "256") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        res = await run(client, "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))",
                        timeout=20)
        assert res["exit_code"] != 0 and res["timed_out"] is False
        assert res["killed"] == "memory" and "MemoryError" in res["stderr"]
        assert "Memory limit exceeded (256 MB)" in res["stderr"]
        await assert_still_serving(sc, client)


async def test_disk_fill_with_many_files_is_stopped_by_the_quota() -> None:
    async with running_sidecar("py", "--disk-quota-mb", "20", "--max-file-size-mb", "5") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        code = ("import itertools\nfor i in itertools.count():\n"
                "    with open(f'fill{i}.bin', 'wb') as f:\n        f.write(b'x' * 1024 * 1024)")
        res = await run(client, code, timeout=30)
        assert res["killed"] == "disk" and res["timed_out"] is False
        assert "disk quota exceeded" in res["stderr"]
        await assert_still_serving(sc, client)


async def test_single_file_size_limit() -> None:
    async with running_sidecar("py", "--max-file-size-mb", "2") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        code = "import os\nwith open('big.bin', 'wb') as f:\n    f.write(b'x' * (5 * 1024 * 1024))"
        res = await run(client, code)
        assert res["exit_code"] != 0 and res["killed"] == "file_size"
        await assert_still_serving(sc, client)


@pytest.mark.parametrize("prewarm", ["true", "false"])
async def test_environment_is_scrubbed(prewarm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KCR_TEST_SECRET", "hunter2")
    async with running_sidecar("py", "--prewarm", prewarm) as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        res = await run(client, "import os, json\nprint(json.dumps(dict(os.environ)))")
        import json

        env = json.loads(res["stdout"])
        assert "KCR_TEST_SECRET" not in env
        assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PYTHONUNBUFFERED"}
        assert not env["HOME"].startswith(sc.working_dir)


async def test_prewarmed_interpreter_killed_while_idle_is_replaced() -> None:
    import os
    import signal

    async with running_sidecar("py") as sc, httpx.AsyncClient(base_url=sc.url, timeout=30) as client:
        (first,) = sc.user_processes()
        os.kill(first, signal.SIGKILL)
        assert await wait_until(lambda: len(sc.user_processes() - {first}) == 1, timeout=10)
        assert any(line.get("event") == "prewarm_died" for line in sc.log_lines())
        assert await wait_until(lambda: not os.path.exists(f"/proc/{first}"), timeout=5)  # reaped
        res = await run(client, "print('fine')")
        assert res["stdout"] == "fine\n"


# A compile step that runs far longer than any budget here: GCC evaluates this constexpr loop
# (4e10 steps) at compile time, within its default evaluation limits.
SLOW_COMPILE = """constexpr long spin() {
  long s = 0;
  for (long i = 0; i < 200000; ++i)
    for (long j = 0; j < 200000; ++j) s += i ^ j;
  return s;
}
constexpr long value = spin();
int main() { return value == 0; }
"""


async def test_compile_timeout_is_its_own_limit_with_a_clear_error() -> None:
    async with running_sidecar("cpp", "--compile-timeout", "2") as sc, \
            httpx.AsyncClient(base_url=sc.url, timeout=60) as client:
        res = await run(client, SLOW_COMPILE, timeout=30)
        assert res["killed"] == "compile_timeout" and res["exit_code"] == 124, res
        assert res["timed_out"] is False  # the program's timeout (30 s) is not what stopped it
        assert "Compilation timed out after 2 seconds" in res["stderr"]
        assert "KCR_COMPILE_TIMEOUT" in res["stderr"] and "the program did not run" in res["stderr"]
        assert await wait_until(lambda: len(sc.user_processes()) <= 1, timeout=5), sc.user_processes()
        # The program's own timeout still binds what runs after the compile step.
        res = await run(client, "int main() { for (;;) {} }", timeout=1)
        assert res["killed"] == "timeout" and res["timed_out"] is True and res["exit_code"] == 124, res
        ok = await run(client, '#include <cstdio>\nint main() { std::puts("still serving"); }')
        assert ok["exit_code"] == 0 and ok["stdout"] == "still serving\n", ok
