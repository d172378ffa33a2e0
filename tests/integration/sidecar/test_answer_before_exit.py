"""A pre-warmed run answers on its interpreter's own "done" report, not on seeing it exit.

The interpreter's exit (Node's, in particular, takes milliseconds of kernel teardown) is
``Runner.settle``'s business after the answer; every request after the answer waits for it. Only
a report the kernel says came from the interpreter itself counts (SO_PASSCRED), and anything else
the program left running still holds the answer and is killed before it, as before.

The runner is driven in-process here so that nothing settles behind the test's back: a program
that forges the report and keeps running shows, deterministically, that the answer did not wait.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from sidecar import proctree
from sidecar.config import parse
from sidecar.languages import Toolchain, lookup
from sidecar.limits import resolve_identity
from sidecar.runner import Runner
from sidecar.sandbox import for_sidecar, not_exiting
from sidecar.server import own_tmp_root, prepare_working_dir
from tests.support.sandbox import run, sandboxed
from tests.support.sidecar import NODE_PATH, public_tmpdir

pytestmark = pytest.mark.integration


@asynccontextmanager
async def runner_in_process(language: str, sandbox: str) -> AsyncIterator[Runner]:
    """A ``Runner`` set up as ``sidecar.server.run`` does, without its HTTP server."""
    root = public_tmpdir()
    cfg = parse(["--language", language, "--working-dir", os.path.join(root, "wd"),
                 "--tmp-root", os.path.join(root, "tmp"), "--node-path", NODE_PATH,
                 "--sandbox", sandbox], environ={})
    spec = lookup(cfg.language)
    assert spec is not None
    identity = resolve_identity(cfg.run_uid, cfg.run_gid, cfg.run_uid_exclusive)
    prepare_working_dir(cfg, identity.uid, identity.gid)
    cfg.tmp_root = own_tmp_root(cfg.tmp_root)
    cfg.working_dir = os.path.abspath(cfg.working_dir)
    box, _warning = await trio.to_thread.run_sync(partial(
        for_sidecar, cfg.sandbox, cfg.working_dir, allow_network=False, ro_paths=cfg.sandbox_ro_paths,
        language=spec.code, python=Toolchain(cfg.python).python, node_path=cfg.node_path,
        uid=identity.uid, gid=identity.gid, tmp_root=cfg.tmp_root))
    runner = Runner(cfg, spec, identity)
    runner.sandbox = box
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.serve)
            yield runner
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def ready_warm(runner: Runner):  # type: ignore[no-untyped-def]
    with trio.fail_after(30):
        while runner.warm is None or not runner.warm.ready.is_set() or runner.warm.limit_pid is None:
            await trio.sleep(0.01)
    return runner.warm


TRIVIAL = {"py": "print('hi')", "js": "console.log('hi')", "bash": "echo hi"}


@pytest.mark.parametrize("language", ["py", "js", "bash"])
async def test_the_report_comes_from_the_interpreter_itself(language: str) -> None:
    async with runner_in_process(language, "bwrap") as runner:
        for _ in range(3):
            warm = await ready_warm(runner)
            res = await runner.execute(TRIVIAL[language], 10, "t")
            assert (res["exit_code"], res["stdout"], res["stderr"]) == (0, "hi\n", ""), res
            # The kernel's credentials name the interpreter (host pid, below bubblewrap's two).
            assert warm.reporter == warm.limit_pid and warm.reporter != warm.process.pid
            await runner.settle()
            assert not not_exiting(warm.limit_pid)
            runner.replenish()


# Forges the "done" report from the interpreter itself (status 5) and runs on.
FORGER = """
import os, time
print('before')
for name in os.listdir('/proc/self/fd'):
    try:
        if os.readlink(f'/proc/self/fd/{name}').startswith('socket:'):
            os.write(int(name), b'D\\x05')
    except OSError:  # the listing's own fd, closed by now
        pass
time.sleep(3600)
"""


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
async def test_answer_does_not_wait_for_the_interpreter_and_settle_stops_it(sandbox: str) -> None:
    async with runner_in_process("py", sandbox) as runner:
        warm = await ready_warm(runner)
        pid = warm.limit_pid
        res = await runner.execute(FORGER, 10, "t")
        # What the program produced up to its report, with the status it reported ...
        assert (res["exit_code"], res["stdout"], res["stderr"]) == (5, "before\n", ""), res
        # ... answered while the interpreter still runs: the answer did not wait for its exit.
        assert not_exiting(pid)
        await runner.settle()  # what every later request does first
        assert not not_exiting(pid)
        runner.replenish()
        res = await runner.execute("print('next')", 10, "t2")
        assert (res["exit_code"], res["stdout"]) == (0, "next\n"), res


# Leave a child running that has already printed: it still holds the answer, is killed before
# it, and its output is complete, as before.
LEAVE_CHILD = {
    "py": """
import os, subprocess
r, w = os.pipe()
subprocess.Popen(['sh', '-c', 'echo child; echo x >&%d; exec sleep 3600' % w], pass_fds=[w])
os.close(w)
os.read(r, 2)
print('parent')
""",
    "bash": """
mkfifo f
( echo child; echo x > f; exec sleep 3600 ) &
read -r _ < f
rm f
echo parent
""",
}


def sleepers(root: int) -> set[int]:
    out = set()
    for pid in proctree.descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"sleep\x003600" in fh.read() and proctree.alive(pid):
                    out.add(pid)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("language", ["py", "bash"])
async def test_a_child_left_running_still_holds_the_answer(language: str) -> None:
    async with sandboxed(language) as (sc, client):
        for _ in range(3):
            res = await run(client, LEAVE_CHILD[language])
            assert (res["exit_code"], res["stdout"], res["stderr"]) == (0, "child\nparent\n", ""), res
            assert sleepers(sc.pid) == set()
