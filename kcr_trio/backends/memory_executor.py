"""In-process executor: the twin of the local and Kubernetes executors, for tests of pure logic.

A "program" is a Python callable ``(code, files) -> RunResult`` that may read and write the
in-memory working directory ``files`` (name -> bytes). It keeps the same acquisition semantics as
the real executors (bounded wait, ``Busy``, one run per sandbox, release on cancellation), which is
what the core's lifecycle tests need.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from kcr_trio.core.errors import Busy, NotFound
from kcr_trio.core.model import GeneratedFile, RunResult

Program = Callable[[str, dict[str, bytes]], Awaitable[RunResult]]


class MemorySandbox:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.files: dict[str, bytes] = {}
        self.args: list[str] = []
        self._before: dict[str, bytes] = {}
        self.ran = False

    async def put_file(self, name: str, chunks: AsyncIterable[bytes]) -> None:
        self.files[name] = b"".join([chunk async for chunk in chunks])

    async def run(self, code: str, *, timeout: float, request_id: str, args: Sequence[str] = ()) -> RunResult:
        self.args = list(args)
        self._before = dict(self.files)
        self.ran = True
        with trio.move_on_after(timeout) as scope:
            result = await self.program(code, self.files)
        if scope.cancelled_caught:
            result = RunResult(exit_code=124, stdout="", stderr="", timed_out=True)
        if result.removed is None:
            result.removed = sorted(set(self._before) - set(self.files))
        return result

    async def generated_files(self) -> list[GeneratedFile]:
        await trio.lowlevel.checkpoint()
        return [
            GeneratedFile(name, len(data))
            for name, data in self.files.items()
            if self._before.get(name) != data
        ]

    @asynccontextmanager
    async def open_file(self, name: str) -> AsyncIterator[AsyncIterator[bytes]]:
        if name not in self.files:
            raise NotFound("File not found")
        data = self.files[name]

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        yield chunks()


class MemoryExecutor:
    ptc_capable = False  # runs no real program: no programmatic tool calling (api/ptc_http.py)

    def __init__(self, program: Program, *, capacity: int = 4, retry_after: float = 2.0) -> None:
        self.program = program
        self.capacity = capacity
        self.warnings: list[str] = []  # nothing on the host to report
        self.retry_after = retry_after
        self._slots = trio.Semaphore(capacity)
        self.released = 0

    @asynccontextmanager
    async def sandbox(self, language: str, *, wait: float) -> AsyncIterator[MemorySandbox]:
        with trio.move_on_after(wait) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            raise Busy("No execution capacity available; try again shortly", retry_after=self.retry_after)
        try:
            yield MemorySandbox(self.program)
        finally:
            self._slots.release()
            self.released += 1

    async def status(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"ready": True, "capacity": self.capacity, "in_use": self.capacity - self._slots.value}
