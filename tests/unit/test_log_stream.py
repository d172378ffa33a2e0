"""``log_stream.BatchingStreamHandler``: access lines share a write, none is lost on a normal
shutdown, and the order on the stream is the order they were logged.

Time is Trio's ``MockClock`` (virtual, jumps when every task waits): the flush delay is observed
without sleeping the test.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from kcr_trio import log_stream
from kcr_trio.log_stream import ACCESS_LOGGER, FLUSH_BYTES, FLUSH_DELAY, BatchingStreamHandler
from kcr_trio.logs import LogFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def handler() -> Iterator[tuple[BatchingStreamHandler, CountingStream]]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(LogFormatter("json"))
    loggers = [logging.getLogger(ACCESS_LOGGER), logging.getLogger("kcr_trio.tests.other")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        yield handler, stream
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def access(n: int) -> None:
    logging.getLogger(ACCESS_LOGGER).info(json.dumps({"event": "access", "n": n}))


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def run(fn: object) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def test_lines_of_one_moment_share_a_write(handler: tuple[BatchingStreamHandler, CountingStream]) -> None:
    h, stream = handler

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            for n in range(5):
                access(n)
            assert stream.getvalue() == ""  # waiting for company
            await trio.sleep(FLUSH_DELAY * 2)  # virtual time
            assert [json.loads(line)["n"] for line in lines(stream)] == [0, 1, 2, 3, 4]
            assert stream.writes == 1
            access(5)  # a later line gets its own write, within the delay
            await trio.sleep(FLUSH_DELAY * 2)
            assert len(lines(stream)) == 6 and stream.writes == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_shutdown_writes_what_waits(handler: tuple[BatchingStreamHandler, CountingStream]) -> None:
    h, stream = handler

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            access(1)
            access(2)
            nursery.cancel_scope.cancel()  # the server stops before the delay is over
        assert [json.loads(line)["n"] for line in lines(stream)] == [1, 2]
        access(3)  # after the flusher: written at once
        assert len(lines(stream)) == 3

    run(main)


def test_flush_at_exit_writes_what_waits(handler: tuple[BatchingStreamHandler, CountingStream]) -> None:
    h, stream = handler

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            access(1)
            h.flush()  # what logging.shutdown() calls at interpreter exit
            assert len(lines(stream)) == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_other_records_keep_the_order(handler: tuple[BatchingStreamHandler, CountingStream]) -> None:
    h, stream = handler

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            access(1)
            logging.getLogger("kcr_trio.tests.other").warning("between")
            access(2)
            await trio.sleep(FLUSH_DELAY * 2)
            nursery.cancel_scope.cancel()
        got = [json.loads(line) for line in lines(stream)]
        assert [g.get("n", g.get("event")) for g in got] == [1, "between", 2]

    run(main)


def test_many_lines_do_not_wait(handler: tuple[BatchingStreamHandler, CountingStream]) -> None:
    h, stream = handler
    total = FLUSH_BYTES // (len(json.dumps({"event": "access", "n": 0})) + 1) + 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            for n in range(total):
                access(n)
            # one write as soon as FLUSH_BYTES had gathered, with no time passing
            assert stream.writes == 1 and len(stream.getvalue()) >= FLUSH_BYTES
            nursery.cancel_scope.cancel()

    run(main)


def test_without_the_flusher_or_off_its_thread_lines_leave_at_once(
    handler: tuple[BatchingStreamHandler, CountingStream],
) -> None:
    h, stream = handler
    access(1)
    assert len(lines(stream)) == 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(h.run)
            await trio.to_thread.run_sync(access, 2)
            assert len(lines(stream)) == 2
            nursery.cancel_scope.cancel()

    run(main)
    assert threading.current_thread() is threading.main_thread()


def test_setup_logging_installs_it() -> None:
    from kcr_trio.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        assert log_stream.installed() is not None
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert log_stream.installed() is None or log_stream.installed() in saved[0]


def test_access_line_encoding_is_unchanged() -> None:
    """``api.scope``'s prebuilt encoder and timestamp write what ``json.dumps``/``strftime`` wrote."""
    import datetime as dt
    import re

    from kcr_trio.api import scope

    record = {"ts": "x", "status": 200, "duration_ms": 0.5, "path": "/é", "odd": dt.timedelta(seconds=1)}
    assert scope._encode(record) == json.dumps(record, separators=(",", ":"), default=str)
    ts = scope._timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ts)
    parsed = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - parsed).total_seconds()) < 60
