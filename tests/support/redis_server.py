"""A real ``redis-server`` process for integration tests.

API (synchronous; use it from fixtures)::

    from tests.support.redis_server import RedisServer, running_redis

    with running_redis() as server:        # starts on a free 127.0.0.1 port, waits for PING
        server.url                          # "redis://127.0.0.1:<port>/0"
        server.host, server.port
        server.env(prefix="t1:")            # {"REDIS_URL": ..., "REDIS_KEY_PREFIX": "t1:", ...}
        server.stop()                       # SIGTERM and wait: an outage (data is gone: no persistence)
        server.start()                      # start again on the same port, wait for PING
        server.kill()                       # SIGKILL (a crash)
        server.command("FLUSHALL")          # one raw RESP command, for assertions and set-up
        server.settings(prefix="t1:")       # a kcr_trio RedisSettings for open_redis_sessions()
    # leaving the block stops the server; nothing is left running

redis-server cannot bind port 0, so a free port is chosen by binding a socket first. The server runs
with ``--save '' --appendonly no`` in a temporary directory: no files are written anywhere else.
Start-up is awaited by polling ``PING`` with a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    def __init__(self, port: int | None = None, binary: str = "redis-server") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = shutil.which(binary) or binary
        self._dir = Path(tempfile.mkdtemp(prefix="kcr-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, prefix: str = "") -> dict[str, str]:
        """Environment for ``RedisSettings``/``Settings`` pointing at this server."""
        return {
            "REDIS_URL": self.url,
            "REDIS_MODE": "standalone",
            "REDIS_KEY_PREFIX": prefix,
            "KCR_SESSION_STORE": "redis",
        }

    def settings(self, prefix: str = "", **overrides: object) -> object:
        """A ``RedisSettings`` for this server (imported lazily: the helper works without kcr_trio)."""
        from kcr_trio.backends.redis_sessions import RedisSettings

        values: dict[str, object] = {"redis_url": self.url, "redis_key_prefix": prefix, "redis_mode": "standalone"}
        values.update(overrides)
        return RedisSettings(**values)

    def start(self) -> None:
        if self.running:
            return
        log = open(self._dir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self._dir),
                "--protected-mode", "no",
                "--loglevel", "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.02)  # polling interval, bounded by the deadline above
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s ({last})")

    def command(self, *args: str | bytes, timeout: float = 2.0) -> bytes:
        """Send one command and return the first reply line (``+PONG``, ``:1``, ``$-1`` …)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(_encode(*args))
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                buf += chunk
            return buf.split(b"\r\n", 1)[0]

    def stop(self, timeout: float = 10.0) -> None:
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
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self._dir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(port: int | None = None) -> Iterator[RedisServer]:
    server = RedisServer(port)
    try:
        server.start()
        yield server
    finally:
        server.close()
