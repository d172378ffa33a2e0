"""Helpers for tests that start real sidecar processes.

``running_sidecar`` starts ``python -m sidecar`` on 127.0.0.1 with a free port (the sidecar binds
port 0 and announces the port on stdout), yields a handle, and on exit stops it (SIGTERM, then
SIGKILL) and kills anything left below it, so no test leaves a process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from sidecar import proctree

REPO = Path(__file__).resolve().parents[2]
NODE_PATH = str(REPO / "tests" / "node" / "node_modules")


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` passes; returns the last value."""
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(interval)
        return True
    return pred()


async def read_to_eof(stream: trio.abc.ReceiveStream, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes; fails if it has not closed within ``timeout``."""
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (a zombie still counts as present)."""
    return not os.path.exists(f"/proc/{pid}")


def public_tmpdir(prefix: str = "kcr-sidecar-test-") -> str:
    """A temp dir the unprivileged run uid can traverse (pytest's tmp_path is 0700 under root)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


@dataclass
class Sidecar:
    pid: int
    port: int
    working_dir: str
    stderr_path: str
    process: trio.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict]:
        out = []
        with open(self.stderr_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def user_processes(self) -> set[int]:
        """Live descendants of the sidecar (user processes, including an idle pre-warm)."""
        return {p for p in proctree.descendants(self.pid) if proctree.alive(p)}


@asynccontextmanager
async def running_sidecar(language: str = "py", *args: str, root: str | None = None,
                          start_timeout: float = 30.0) -> AsyncIterator[Sidecar]:
    own_root = root is None
    root = root or public_tmpdir()
    wd = os.path.join(root, "wd")
    stderr_path = os.path.join(root, "sidecar.log")
    argv = [sys.executable, "-m", "sidecar", "--host", "127.0.0.1", "--port", "0", "--language", language,
            "--working-dir", wd, "--tmp-root", os.path.join(root, "tmp"), "--announce",
            "--node-path", NODE_PATH, *args]
    err = open(stderr_path, "wb")  # noqa: SIM115 - owned by the process, closed below
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, cwd=str(REPO))
    try:
        line = b""
        with trio.move_on_after(start_timeout):
            assert proc.stdout is not None
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                line += chunk
        if not line:
            raise RuntimeError(f"sidecar did not start: {Path(stderr_path).read_text()[-2000:]}")
        info = json.loads(line)
        yield Sidecar(proc.pid, int(info["port"]), wd, stderr_path, proc)
    finally:
        with trio.CancelScope(shield=True):
            leftovers = proctree.descendants(proc.pid)
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            err.close()
            if own_root:
                shutil.rmtree(root, ignore_errors=True)
