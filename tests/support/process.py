"""The lifecycle every test server shares: a subprocess with a private directory and a log file.

Subclasses start ``self._proc`` themselves (each server has its own command line and readiness
check) and name their log file in ``LOG_NAME``; stopping, killing, reading the log and removing the
directory are the same for all of them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class ManagedServer:
    LOG_NAME = "server.log"
    _dir: Path
    _proc: subprocess.Popen[bytes] | None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it will not go): an outage the test can end with start()."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self._dir / self.LOG_NAME).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
