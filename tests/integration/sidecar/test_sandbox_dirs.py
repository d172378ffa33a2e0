"""A SIGKILLed server's sandbox directories are removed by the next server, never a live one's.

Before: the sidecar directories (``<KCR_DATA_DIR>/sandboxes/<lang>-<hex>``, user files included)
of a server that died without cleaning up stayed on disk for good; the next server removed only
stale ``/etc`` views and control groups. Now each server keeps its sidecar directories in one
``srv-<hex>`` directory locked while it or any of its sidecars lives
(``kcr_trio.backends.sandbox_dirs``), and a starting server removes the unlocked ones.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kcr_trio.backends import sandbox_dirs
from tests.integration.sidecar.test_sidecar_lifeline import _alive, _below, _cmdline
from tests.support.server import TEST_KEY, ServerProcess, server_process, wait_until
from tests.support.sidecar import public_tmpdir

pytestmark = pytest.mark.integration


@pytest.fixture
def data_dir() -> Iterator[str]:
    path = public_tmpdir("kcr-sandbox-dirs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server_dirs(data_dir: str) -> set[Path]:
    return set((Path(data_dir) / "sandboxes").glob(f"{sandbox_dirs.PREFIX}*"))


def _sidecars(server: ServerProcess) -> set[int]:
    return {p for p in _below(server.pid) if " -m sidecar " in _cmdline(p)}


def _run(server: ServerProcess, code: str) -> str:
    resp = httpx.post(server.url + "/exec", headers={"X-API-Key": TEST_KEY}, timeout=60,
                      json={"lang": "py", "code": code})
    assert resp.status_code == 200, resp.text
    out: str = resp.json()["stdout"]
    return out


def _owned_dir(server: ServerProcess, data_dir: str) -> Path:
    """The ``srv-*`` directory holding this server's sidecar directories (by a sidecar's argv)."""
    def find() -> Path | None:
        for pid in _sidecars(server):
            for d in _server_dirs(data_dir):
                if f"{d}/" in _cmdline(pid):
                    return d
        return None
    found: Path = wait_until(find, 60, interval=0.1, message="a sidecar of the server")
    return found


def test_the_next_server_removes_a_killed_servers_dirs_and_keeps_a_live_ones(data_dir: str) -> None:
    env = {"KCR_DATA_DIR": data_dir, "POD_POOL_PY": "1", "POD_POOL_JS": "0", "POD_POOL_BASH": "0"}
    with server_process(env) as killed, server_process(env) as live:
        # The second server started while the first lived: the first's directory is untouched.
        killed_dir, live_dir = _owned_dir(killed, data_dir), _owned_dir(live, data_dir)
        assert killed_dir != live_dir
        assert _run(killed, "open('left.txt', 'w').write('x'); print('ok')") == "ok\n"

        sidecars = _sidecars(killed)
        everything = set(sidecars)
        for pid in sidecars:
            everything |= _below(pid)
        os.kill(killed.pid, signal.SIGKILL)
        killed.proc.wait(timeout=10)
        wait_until(lambda: not _alive(everything), 30, interval=0.1,
                   message="the killed server's sidecars to exit")
        # A SIGKILLed server removes nothing: its sidecars' directories are still there.
        assert [p.name for p in killed_dir.glob("py-*")], "expected the killed server's sidecar dirs"

        with server_process(env) as successor:
            assert not killed_dir.exists(), "the next server should remove the dead server's directory"
            assert live_dir.is_dir(), "a live server's directory must never be removed"
            assert _run(live, "print('still here')") == "still here\n"
            assert _run(successor, "print(1)") == "1\n"
        assert live_dir.is_dir()
    # Servers that stop normally remove their own directory.
    assert _server_dirs(data_dir) == set()


def test_a_locked_directory_is_never_swept_and_an_unlocked_one_is(tmp_path: Path) -> None:
    mine = sandbox_dirs.claim(tmp_path)
    (mine.path / "py-0123" / "wd").mkdir(parents=True)
    assert mine.path.name.startswith(sandbox_dirs.PREFIX)
    assert sandbox_dirs.sweep_dead(tmp_path) == [] and mine.path.is_dir()
    legacy = tmp_path / "py-legacy"  # an older version's directory: no owner known, left alone
    legacy.mkdir()
    mine.close()
    assert sandbox_dirs.sweep_dead(tmp_path) == [mine.path]
    assert not mine.path.exists() and legacy.is_dir()
