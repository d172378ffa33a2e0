"""Start kcr-trio for a test: in-process (same Trio loop) or as a real ``kcr-trio serve`` process.

In-process::

    async with running_server(settings, executor=...) as url:   # url like "http://127.0.0.1:PORT"
        ...

Subprocess::

    with server_process(env={...}) as proc:   # proc.url, proc.pid, proc.log_lines()
        ...

Both bind 127.0.0.1 on a free port and always stop the server (and, for the subprocess, its whole
process group) on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from kcr_trio.app import serve
from kcr_trio.config import Settings

TEST_KEY = "test-key-0123456789abcdef"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_host": "127.0.0.1",
        "api_port": 0,
        "api_key": TEST_KEY,
        "kcr_data_dir": data_dir,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running_server(settings: Settings, *, executor: Any = None) -> AsyncIterator[str]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(settings, executor=executor, shutdown=shutdown, task_status=task_status))
        try:
            yield binds[0]
        finally:
            shutdown.set()


def wait_until(predicate: Any, timeout: float, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def await_until(predicate: Any, timeout: float, interval: float = 0.02, message: str = "condition") -> Any:
    """Async twin of ``wait_until`` (predicate may be sync or async)."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self._lines = lines

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_lines(self) -> list[str]:
        return list(self._lines)


@contextmanager
def server_process(env: dict[str, str] | None = None, *, ready_timeout: float = 60.0) -> Iterator[ServerProcess]:
    """Run ``python -m kcr_trio serve`` on a free port with a fresh data directory."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="kcr-test-")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "KCR_", "REDIS_", "MINIO_"))}
    full_env.update(
        {
            "API_HOST": "127.0.0.1",
            "API_PORT": str(port),
            "API_KEY": TEST_KEY,
            "KCR_DATA_DIR": data_dir,
            "LOG_LEVEL": "INFO",
        }
    )
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "kcr_trio", "serve"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError("server exited early:\n" + "\n".join(lines[-30:]))
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, ready_timeout, interval=0.1, message="server ready")
        yield ServerProcess(proc, url, lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)


@contextmanager
def server_on_stores(stores: str, env: dict[str, str], *, name: str) -> Iterator[ServerProcess]:
    """A ``kcr-trio serve`` on the embedded stores (``stores == "embedded"``) or on a real
    redis-server and a real S3 server (``"redis-s3"``): the two backend sets we ship, for fixtures
    parametrised over both. ``name`` keeps their Redis prefix and bucket apart."""
    if stores == "embedded":
        with server_process(env) as server:
            yield server
        return
    from tests.support.redis_server import running_redis
    from tests.support.s3_server import running_s3

    with running_redis() as redis, running_s3() as s3:
        full = {
            **env,
            **redis.env(prefix=f"{name}:"),
            **s3.env(bucket=name),
            "KCR_SESSION_STORE": "redis",
            "KCR_FILE_STORE": "s3",
        }
        with server_process(full) as server:
            yield server
