"""Shared pieces of the operations tests (``tests/integration/ops``): a scripted in-process
executor, captured logs, metrics scraping.

The servers here run in-process on real loopback sockets with the in-process executor twin
(``backends/memory_executor.py``): these tests are about the HTTP edge (metrics, logs, limits,
schema, bad input). Tests that need real sidecars use ``server_process`` and skip while the local
executor is not there.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from kcr_trio.backends.memory_executor import MemoryExecutor
from kcr_trio.core.errors import Unavailable
from kcr_trio.core.model import RunResult
from kcr_trio.logs import LogFormatter
from tests.support.server import TEST_KEY, make_settings, running_server

H = {"X-API-Key": TEST_KEY}


class Program:
    """Scripted runs: ``sleep:N``, ``forever``, ``fail``, ``fail:N``, ``lines:N`` (N output lines), else ``done``."""

    def __init__(self) -> None:
        self.running = 0
        self.cancelled = 0
        self.request_ids: list[str] = []

    async def __call__(self, code: str, files: dict[str, bytes]) -> RunResult:
        self.running += 1
        try:
            if code.startswith("sleep:"):
                await trio.sleep(float(code.split(":")[1]))
            elif code == "forever":
                await trio.sleep_forever()
            elif code == "fail":
                raise Unavailable("Sandbox failed: the sidecar went away")
            elif code.startswith("fail:"):  # fails after N seconds (e.g. behind a committed 200)
                await trio.sleep(float(code.split(":")[1]))
                raise Unavailable("Sandbox failed: the sidecar went away")
            elif code.startswith("lines:"):
                return RunResult(0, "x\n" * int(code.split(":")[1]), "")
            elif code.startswith("write:"):
                files["out.txt"] = code.encode()
            return RunResult(0, "done", "")
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


class LogCapture:
    """Every log record, formatted by the server's own formatter (what an operator would see)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(LogFormatter("json"))

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "access"]


@asynccontextmanager
async def ops_server(
    tmp_path: Path, *, capacity: int = 2, program: Program | None = None, **overrides: Any
) -> AsyncIterator[tuple[str, Program, MemoryExecutor]]:
    program = program or Program()
    executor = MemoryExecutor(program, capacity=capacity)
    settings = make_settings(tmp_path, log_level="INFO", **overrides)
    async with running_server(settings, executor=executor) as url:
        yield url, program, executor


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def raw(port: int, data: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    return stream


async def read_all(stream: trio.SocketStream, limit: float = 10.0) -> bytes:
    out = b""
    with trio.move_on_after(limit):
        while chunk := await stream.receive_some():
            out += chunk
    return out


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of a sample over every label set that matches ``labels``."""
    return sum(
        value
        for (sample, label_set), value in samples.items()
        if sample == name and all(dict(label_set).get(k) == v for k, v in labels.items())
    )


async def get_metrics(client: httpx.AsyncClient, url: str) -> dict[Any, float]:
    response = await client.get(url + "/metrics", headers=H)
    assert response.status_code == 200
    return scrape(response.text)
