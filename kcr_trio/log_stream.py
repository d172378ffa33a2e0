"""The server's stderr handler: access lines leave in small batches, everything else at once.

Why: profiled under ``wrk`` on ``GET /health``, the one ``write`` to stderr (a pipe to the log
collector) per access line was about a fifth of the server's CPU per request — as much as sending
the answer itself. Lines that finish within a few milliseconds of each other can share that write.

The promise, precisely:

* **Every request still gets exactly one line**, built and handed to logging when the request ends
  (``api.scope``); handlers other than this one (tests, an operator's extra handler) see it at once.
* **On stderr it appears within** :data:`FLUSH_DELAY` **seconds** of the request's end (sooner when
  :data:`FLUSH_BYTES` have gathered). Only access lines wait; any other record first writes the
  waiting access lines, so the order on the stream is the order the lines were logged.
* **Nothing is lost on a normal shutdown**: the flusher writes what is left when its task ends
  (SIGTERM, Ctrl-C, a crash that unwinds the server), and :meth:`flush` — which ``logging`` calls at
  interpreter exit — writes it too.
* **What a hard crash can lose**: a ``SIGKILL``, an OOM kill or a segfault loses the access lines of
  at most the last :data:`FLUSH_DELAY` seconds (the lines of requests that ended in that window).
  Every other log line is written at once, as before.

Batching only happens while :meth:`BatchingStreamHandler.run` is running in the server's Trio loop,
and only for lines logged from that loop's thread; anywhere else (CLI commands, tests without the
flusher, other threads) every line is written when it is logged.
"""

from __future__ import annotations

import logging
import threading
from typing import TextIO

import trio

ACCESS_LOGGER = "kcr_trio.access"
FLUSH_DELAY = 0.02  # seconds an access line may wait for company
FLUSH_BYTES = 64 * 1024  # write at once when this much has gathered


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that gathers access lines while :meth:`run` runs (module docstring)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._loop_thread: int | None = None  # the Trio thread while run() runs
        self._wake: trio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called by Handler.handle with self.lock held.
        if record.name != ACCESS_LOGGER or self._loop_thread != threading.get_ident():
            self._write_pending()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self._write_pending()
        elif len(self._pending) == 1 and self._wake is not None:
            self._wake.set()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._write_pending()
        super().flush()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as StreamHandler does: a broken stream must not fail the request
            self.handleError(logging.makeLogRecord({"msg": "access lines lost", "name": ACCESS_LOGGER}))

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gather access lines until cancelled; write the rest on the way out (never loses a line
        on a normal shutdown). Start it in the server's nursery."""
        self._loop_thread = threading.get_ident()
        try:
            task_status.started()
            while True:
                self._wake = trio.Event()
                if not self._pending:
                    await self._wake.wait()
                await trio.sleep(FLUSH_DELAY)
                with self.lock:  # type: ignore[union-attr]
                    self._write_pending()
        finally:
            self._loop_thread = None
            self._wake = None
            with self.lock:  # type: ignore[union-attr]
                self._write_pending()


def installed() -> BatchingStreamHandler | None:
    """The root logger's batching handler, if ``logs.setup_logging`` installed one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchingStreamHandler):
            return handler
    return None
