"""Pre-warmed JavaScript from a Node start-up snapshot (``sidecar/node_snapshot.py``) runs a
program exactly as ``node -e NODE_BOOT`` did: same argv, heap cap, exit status, uncaught errors,
``child_process.fork`` and a fresh interpreter per run; only the start costs less CPU."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from sidecar import node_snapshot
from sidecar.languages import Toolchain, node_flags
from tests.support.sandbox import run, sandboxed
from tests.support.sidecar import Sidecar, public_tmpdir

pytestmark = pytest.mark.integration

MEMORY_MB = 256

PROBE = """
const v8 = require('v8');
const cmd = require('fs').readFileSync('/proc/self/cmdline', 'utf8').split('\\0');
console.log(JSON.stringify({
  snapshot: cmd.includes('--snapshot-blob'),
  execArgv: process.execArgv,
  argv: process.argv.slice(1),
  main: require.main === module,
  heapMb: Math.round(v8.getHeapStatistics().heap_size_limit / 1048576),
  leaked: typeof globalThis.__kcrMark !== 'undefined',
}));
globalThis.__kcrMark = 1;
"""


@asynccontextmanager
async def snapshot_sidecar() -> AsyncIterator[tuple[Sidecar, httpx.AsyncClient, str]]:
    root = public_tmpdir("kcr-node-snapshot-")
    snap_dir = os.path.join(root, "snap")
    os.mkdir(snap_dir)
    try:
        async with sandboxed("js", "--node-snapshot-dir", snap_dir, "--max-memory-mb", str(MEMORY_MB),
                             root=root) as (sc, client):
            yield sc, client, snap_dir
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_a_snapshot_started_run_sees_what_a_plain_one_sees() -> None:
    async with snapshot_sidecar() as (_sc, client, snap_dir):
        assert [n for n in os.listdir(snap_dir) if n.endswith(".blob")], "the snapshot was not built"
        first = json.loads((await run(client, PROBE))["stdout"])
        assert first["snapshot"] is True  # the pre-warmed interpreter did start from the blob
        assert first["execArgv"] == node_flags(MEMORY_MB)  # no trace of the snapshot for children
        assert first["argv"] == ["/mnt/data/code.js"] and first["main"] is True
        assert MEMORY_MB <= first["heapMb"] < MEMORY_MB + 128  # the heap cap still applies
        assert first["leaked"] is False
        second = json.loads((await run(client, PROBE))["stdout"])
        assert second["snapshot"] is True and second["leaked"] is False  # a fresh interpreter


async def test_status_errors_and_fork_are_unchanged() -> None:
    async with snapshot_sidecar() as (_sc, client, _dir):
        res = await run(client, "console.log('a'); process.exitCode = 3;")
        assert (res["exit_code"], res["stdout"]) == (3, "a\n"), res
        res = await run(client, "function f() { throw new Error('boom'); }\nf();")
        assert res["exit_code"] == 1 and "Error: boom" in res["stderr"] and "code.js:1" in res["stderr"], res
        fork = ("const fs = require('fs'); fs.writeFileSync('kid.js', \"process.send('hi ' + process.argv[2]);\");\n"
                "const kid = require('child_process').fork('./kid.js', ['there']);\n"
                "kid.on('message', (m) => { console.log(m); kid.disconnect(); });\n"
                "kid.on('exit', (c) => console.log('kid exit', c));\n")
        res = await run(client, fork)
        assert res["exit_code"] == 0 and res["stdout"] == "hi there\nkid exit 0\n", res


def test_a_blob_is_built_once_per_directory_and_refused_flags_mean_none() -> None:
    node = Toolchain()("node")
    directory = public_tmpdir("kcr-node-snapshot-unit-")
    try:
        blob = node_snapshot.ensure(directory, node, node_flags(128))
        assert blob is not None and os.path.isfile(blob)
        assert oct(os.stat(blob).st_mode & 0o777) == oct(0o444)
        mtime = os.stat(blob).st_mtime_ns
        assert node_snapshot.ensure(directory, node, node_flags(128)) == blob
        assert os.stat(blob).st_mtime_ns == mtime  # reused, not rebuilt
        other = node_snapshot.ensure(directory, node, node_flags(192))
        assert other is not None and other != blob  # other flags: another blob (V8 checks them)
        assert node_snapshot.ensure(directory, node, ["--no-such-flag-at-all"]) is None
        assert sorted(n for n in os.listdir(directory) if not n.endswith(".blob")) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)
