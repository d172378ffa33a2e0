"""Processes in the sandbox: environment, privileges, signals, pre-warm, and nothing left behind."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import trio

from sidecar import proctree
from sidecar.sandbox import payload_pid
from tests.support.sandbox import processes_mentioning, run, sandboxed, split_token
from tests.support.sidecar import wait_until

pytestmark = pytest.mark.integration

ENV_CODE = """import os
secret = HALF_A + HALF_B
print('env', any(secret in v for v in os.environ.values()))
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print('pids', len(pids))
hits = []
for p in pids:
    for f in ('environ', 'cmdline'):
        try:
            if secret.encode() in open(f'/proc/{p}/{f}', 'rb').read():
                hits.append(f'{p}/{f}')
        except OSError:
            pass
print('hits', hits)
print('parent-environ', open(f'/proc/{os.getppid()}/environ', 'rb').read())
print('sidecar', os.path.exists(f'/proc/{SIDECAR_PID}'))
"""


async def test_server_environment_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret, half_a, half_b = split_token()
    monkeypatch.setenv("KCR_SANDBOX_TEST_SECRET", secret)  # inherited by the sidecar process
    async with sandboxed("py") as (sc, client):
        with open(f"/proc/{sc.pid}/environ", "rb") as fh:
            assert secret.encode() in fh.read()  # the sidecar has it ...
        code = f"HALF_A, HALF_B, SIDECAR_PID = {half_a!r}, {half_b!r}, {sc.pid}\n" + ENV_CODE
        res = await run(client, code)
        assert res["exit_code"] == 0, res["stderr"]
        out = dict(line.split(" ", 1) for line in res["stdout"].splitlines())
        assert out["env"] == "False" and out["hits"] == "[]"  # ... the program does not
        assert out["sidecar"] == "False"  # nor can it see the sidecar at all
        assert int(out["pids"]) <= 3  # bwrap's reaper and the program: a PID namespace of its own
        assert secret not in res["stdout"] + res["stderr"]


PRIVS_CODE = """import os, subprocess
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
print('uids', status['Uid'].split())
print('caps', [status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')])
print('nnp', status['NoNewPrivs'].strip())
r = subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True, text=True)
print('nested-userns', r.returncode, r.stdout.strip())
"""


async def test_unprivileged_without_new_privileges() -> None:
    async with sandboxed("py") as (_sc, client):
        res = await run(client, PRIVS_CODE)
        assert res["exit_code"] == 0, res["stderr"]
        out = dict(line.split(" ", 1) for line in res["stdout"].splitlines())
        assert "'0'" not in out["uids"]
        assert out["caps"] == str(["0000000000000000"] * 5)
        assert out["nnp"] == "1"
        # No user namespace of its own: no way to become root, even a fake one.
        assert not out["nested-userns"].startswith("0") and out["nested-userns"] != "0 0"


KILL_CODE = {
    "py": """import os, signal
for target in (-1, os.getppid()):
    try:
        os.kill(target, signal.SIGKILL)
    except ProcessLookupError:  # kill(-1): nothing else to signal in the namespace
        pass
try:
    os.kill(SIDECAR_PID, signal.SIGKILL)
    print('sidecar: signalled')
except ProcessLookupError:
    print('sidecar: no such process')
except PermissionError:
    print('sidecar: visible but not permitted')
print('still here')
""",
    "bash": """kill -9 -1
kill -9 $PPID
if kill -9 $SIDECAR_PID 2>/dev/null; then echo "sidecar: signalled"
elif [ -e /proc/$SIDECAR_PID ]; then echo "sidecar: visible but not permitted"
else echo "sidecar: no such process"; fi
echo still here
""",
    "c": r"""#include <stdio.h>
#include <signal.h>
#include <errno.h>
#include <unistd.h>
int main(void) {
  kill(-1, SIGKILL);
  kill(getppid(), SIGKILL);
  if (kill(SIDECAR_PID, SIGKILL) == 0) printf("sidecar: signalled\n");
  else if (errno == ESRCH) printf("sidecar: no such process\n");
  else printf("sidecar: visible but not permitted\n");
  printf("still here\n");
  return 0;
}
""",
}

BYSTANDER = """import os, time
open('/mnt/data/started', 'w').close()
deadline = time.monotonic() + 60
while not os.path.exists('/mnt/data/stop') and time.monotonic() < deadline:
    time.sleep(0.01)
print('survived')
"""


@pytest.mark.parametrize("lang", ["py", "bash", "c"])
async def test_kill_everything_reaches_only_the_run(lang: str) -> None:
    # A bystander program runs under the same uid in another sandbox: `kill -9 -1` must miss it.
    async with sandboxed("py") as (other, other_client), sandboxed(lang) as (sc, client):
        bystander: dict = {}

        async def run_bystander() -> None:
            bystander.update(await run(other_client, BYSTANDER, timeout=90))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_bystander)
            assert await wait_until(lambda: os.path.exists(os.path.join(other.working_dir, "started")), 30)
            if lang == "py":
                code = f"SIDECAR_PID = {sc.pid}\n" + KILL_CODE["py"]
            elif lang == "bash":
                code = f"SIDECAR_PID={sc.pid}\n" + KILL_CODE["bash"]
            else:
                code = f"#define SIDECAR_PID {sc.pid}\n" + KILL_CODE["c"]
            res = await run(client, code)
            open(os.path.join(other.working_dir, "stop"), "w").close()
        assert res["exit_code"] == 0, (res["stdout"], res["stderr"])
        assert res["stdout"].splitlines() == ["sidecar: no such process", "still here"]
        assert bystander["exit_code"] == 0 and bystander["stdout"] == "survived\n", bystander
        for proc, c in ((sc, client), (other, other_client)):
            assert proc.process.returncode is None
            assert (await c.get("/health")).status_code == 200
        assert (await run(client, {"py": "print(42)", "bash": "echo 42",
                                   "c": '#include <stdio.h>\nint main(void){puts("42");return 0;}'}[lang]))["stdout"] == "42\n"


PREWARM_CODE = {
    "py": "import resource\nprint(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
          "print(resource.getrlimit(resource.RLIMIT_CPU)[0])",
    "bash": "read -r -a f < /proc/self/stat; s=\"${f[*]}\"; s=\"${s##*) }\"; read -r -a g <<< \"$s\"\n"
            "echo \"${g[19]}\"\nulimit -t",
}


def sandbox_processes(sc: object) -> set[int]:
    """bwrap processes of this sidecar's sandboxes (their argv binds its working dir)."""
    return processes_mentioning(sc.working_dir + "\x00/mnt/data")  # type: ignore[attr-defined]


def _may_adjust_other_uids_limits() -> bool:
    """prlimit(2) on another uid's process needs CAP_SYS_RESOURCE (some containers drop it)."""
    if os.geteuid() != 0:
        return True  # the program runs as our own uid
    with open("/proc/self/status") as fh:
        eff = next(int(line.split()[1], 16) for line in fh if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))  # CAP_SYS_RESOURCE


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[19]


@pytest.mark.parametrize("lang", ["py", "bash"])
async def test_prewarmed_interpreter_runs_inside_the_sandbox(lang: str) -> None:
    async with sandboxed(lang) as (sc, client):
        for _ in range(2):  # the first warm process and its replacement
            chain: list[tuple[int, int]] = []

            def warm_chain_complete(chain: list[tuple[int, int]] = chain) -> bool:
                # bwrap (a child of the sidecar) → its reaper → the waiting interpreter. The previous
                # run's interpreter may still be tearing down, so count the chain, not processes.
                chain.clear()
                for p in sc.user_processes():
                    try:
                        if os.readlink(f"/proc/{p}/exe").endswith("bwrap") and proctree._stat(p)[1] == sc.pid:  # type: ignore[index]
                            w = payload_pid(p)
                            if w != p and not os.readlink(f"/proc/{w}/exe").endswith("bwrap"):
                                chain.append((p, w))
                    except OSError:
                        continue
                return len(chain) == 1

            assert await wait_until(warm_chain_complete, 30)
            ((outer, warm),) = chain
            assert warm != outer
            warm_started = _start_ticks(warm)
            res = await run(client, PREWARM_CODE[lang], timeout=5)
            assert res["exit_code"] == 0, res["stderr"]
            started, cpu_limit = res["stdout"].split()
            # The program is the process that was waiting before the request (same start time),
            # and it served exactly this run.
            assert started == warm_started
            # The answer does not wait for the interpreter's exit; every later request does
            # (``Runner.settle``): by then it is gone.
            assert (await client.get("/files")).status_code == 200
            assert not proctree.alive(warm)
            # RLIMIT_CPU was tightened on the interpreter itself (below bwrap): this run's 5 s + 1.
            if _may_adjust_other_uids_limits():
                assert int(cpu_limit) <= 8


async def test_nothing_survives_runs_timeouts_disconnects_or_the_sidecar() -> None:
    async with sandboxed("bash") as (sc, client):
        res = await run(client, "sleep 3071 &\nsetsid sleep 3072 &\n( sleep 3073 & )\n"
                                 "nohup sleep 3074 >/dev/null 2>&1 &\necho started")
        assert res["stdout"] == "started\n"
        assert not processes_mentioning("sleep\x00307")
        res = await run(client, "sleep 3075", timeout=1)
        assert res["timed_out"] is True and not processes_mentioning("sleep\x00307")
        # Disconnect mid-run: the whole sandbox goes.
        async with httpx.AsyncClient(base_url=sc.url, timeout=60) as other:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, other, "sleep 3076 & sleep 3077", 60)
                assert await wait_until(lambda: len(processes_mentioning("sleep\x00307")) == 2, 20)
                nursery.cancel_scope.cancel()
        assert await wait_until(lambda: not processes_mentioning("sleep\x00307"), 5)
        # The processes die first; the sidecar then finishes its clean-up of the cancelled run
        # (only then would it take another run, which in production it never gets).
        with trio.fail_after(10):
            while (await client.get("/health")).json()["busy"]:
                await trio.sleep(0.01)
        assert (await run(client, "echo ok"))["stdout"] == "ok\n"
        # Only the idle pre-warmed interpreter's sandbox is left, and it goes with the sidecar.
        assert await wait_until(lambda: len(sandbox_processes(sc)) == 2, 10)  # bwrap and its reaper
        sc.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await sc.process.wait()
        assert not sandbox_processes(sc)


async def test_a_crashed_sidecar_takes_its_sandboxes_along() -> None:
    async with sandboxed("py") as (sc, _client):
        assert await wait_until(lambda: len(sandbox_processes(sc)) == 2, 10)
        sandboxes = sandbox_processes(sc) | sc.user_processes()
        assert len(sandboxes) == 3  # the idle pre-warm: bwrap, its reaper, the interpreter
        sc.process.send_signal(signal.SIGKILL)  # no cleanup code runs: bwrap --die-with-parent
        await sc.process.wait()
        assert await wait_until(lambda: not any(proctree.alive(p) for p in sandboxes), 5)
