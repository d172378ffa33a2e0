"""A real ``redis-server`` process for integration tests.

API (synchronous; use it from fixtures)::

    from tests.support.redis_server import RedisServer, running_redis

    unique_prefix()                         # a fresh REDIS_KEY_PREFIX, to share one server safely
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

    with running_redis_cluster() as cluster:     # 3 masters (REDIS_MODE=cluster)
        cluster.nodes, cluster.env(prefix="t1:"), cluster.settings(prefix="t1:")
    with running_redis_sentinel() as sentinel:   # 1 master + 1 sentinel (REDIS_MODE=sentinel)
        sentinel.env(prefix="t1:"), sentinel.settings(prefix="t1:")
    RedisServer(tls=make_tls_files(dir))         # TLS only (tests.support.tls); url is rediss://

redis-server cannot bind port 0, so a free port is chosen by binding a socket first. The server runs
with ``--save '' --appendonly no`` in a temporary directory: no files are written anywhere else.
Start-up is awaited by polling ``PING`` with a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.process import ManagedServer

START_TIMEOUT = 10.0


def unique_prefix() -> str:
    """A fresh ``REDIS_KEY_PREFIX`` so tests sharing one server never see each other's keys."""
    import secrets

    return f"t{secrets.token_hex(6)}:"


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


def _command(
    host: str, port: int, *args: str | bytes, timeout: float = 2.0, ssl_context: ssl.SSLContext | None = None
) -> bytes:
    """Send one command; return the raw reply (small replies only: reads until the server pauses)."""
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if ssl_context is not None:
            s = stack.enter_context(ssl_context.wrap_socket(s, server_hostname=host))
        s.sendall(_encode(*args))
        buf = s.recv(65536)
        if not buf:
            raise ConnectionError("redis closed the connection")
        s.settimeout(0.05)
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except TimeoutError:
            pass
        return buf


class RedisServer(ManagedServer):
    LOG_NAME = "redis.log"

    def __init__(
        self,
        port: int | None = None,
        binary: str = "redis-server",
        extra_args: list[str] | None = None,
        tls: Any = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = shutil.which(binary) or binary
        self.extra_args = list(extra_args or [])
        self.tls = tls  # tests.support.tls.TlsFiles: serve TLS only, on ``port``
        self._dir = Path(tempfile.mkdtemp(prefix="kcr-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

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
                *self._port_args(),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self._dir),
                "--protected-mode", "no",
                "--loglevel", "warning",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_ready()

    def _port_args(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        return [
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
            "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
        ]

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
        ctx = self.tls.client_context() if self.tls else None
        return _command(self.host, self.port, *args, timeout=timeout, ssl_context=ctx).split(b"\r\n", 1)[0]


@contextlib.contextmanager
def running_redis(port: int | None = None) -> Iterator[RedisServer]:
    server = RedisServer(port)
    try:
        server.start()
        yield server
    finally:
        server.close()


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port < 55535:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``.

    ``nodes`` is ``"127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"`` (``REDIS_CLUSTER_NODES`` format).
    """

    def __init__(self, masters: int = 3) -> None:
        self.servers: list[RedisServer] = []
        for _ in range(masters):
            port = free_cluster_port()
            self.servers.append(
                RedisServer(port, extra_args=["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"])
            )

    @property
    def nodes(self) -> str:
        return ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def env(self, prefix: str = "") -> dict[str, str]:
        return {"REDIS_MODE": "cluster", "REDIS_CLUSTER_NODES": self.nodes, "REDIS_KEY_PREFIX": prefix,
                "KCR_SESSION_STORE": "redis"}

    def settings(self, prefix: str = "", **overrides: object) -> object:
        from kcr_trio.backends.redis_sessions import RedisSettings

        values: dict[str, object] = {"redis_mode": "cluster", "redis_cluster_nodes": self.nodes, "redis_key_prefix": prefix}
        values.update(overrides)
        return RedisSettings(**values)

    def start(self) -> None:
        for server in self.servers:
            server.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"{s.host}:{s.port}" for s in self.servers],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            infos = [_command(s.host, s.port, "CLUSTER", "INFO") for s in self.servers]
            if all(b"cluster_state:ok" in info for info in infos):
                return
            time.sleep(0.05)  # polling interval, bounded by the deadline above
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for server in self.servers:
            server.close()


class RedisSentinelServers:
    """One master and one sentinel watching it as ``mymaster``."""

    def __init__(self, master_name: str = "mymaster") -> None:
        self.master = RedisServer()
        self.master_name = master_name
        self.sentinel_port = free_port()
        conf = self.master._dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.master._dir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {self.master.port} 1\n"
        )

    def env(self, prefix: str = "") -> dict[str, str]:
        return {"REDIS_MODE": "sentinel", "REDIS_SENTINEL_NODES": f"127.0.0.1:{self.sentinel_port}",
                "REDIS_SENTINEL_MASTER": self.master_name, "REDIS_KEY_PREFIX": prefix, "KCR_SESSION_STORE": "redis"}

    def settings(self, prefix: str = "", **overrides: object) -> object:
        from kcr_trio.backends.redis_sessions import RedisSettings

        values: dict[str, object] = {
            "redis_mode": "sentinel",
            "redis_sentinel_nodes": f"127.0.0.1:{self.sentinel_port}",
            "redis_sentinel_master": self.master_name,
            "redis_key_prefix": prefix,
        }
        values.update(overrides)
        return RedisSettings(**values)

    def start(self) -> None:
        self.master.start()
        log = open(self.master._dir / "sentinel.log", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [self.master.binary, str(self.master._dir / "sentinel.conf"), "--sentinel"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                reply = _command("127.0.0.1", self.sentinel_port, "SENTINEL", "get-master-addr-by-name", self.master_name)
                if str(self.master.port).encode() in reply:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # polling interval, bounded by the deadline above
        raise RuntimeError("redis sentinel did not start")

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.master.close()


@contextlib.contextmanager
def running_redis_cluster(masters: int = 3) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(masters)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def running_redis_sentinel() -> Iterator[RedisSentinelServers]:
    servers = RedisSentinelServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()
