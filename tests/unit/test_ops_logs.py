"""Log formatting: structlog JSON, access lines passed through, request ids, redaction."""

from __future__ import annotations

import io
import json
import logging
import re

import structlog

from kcr_trio.api import scope as scope_module
from kcr_trio.logs import LogFormatter, setup_logging


def capture() -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter("json"))
    logger = logging.getLogger("tests.ops.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream, handler


def test_records_become_json_with_extras_and_redaction() -> None:
    logger, stream, handler = capture()
    try:
        logger.warning("store slow %s", "now", extra={"latency_ms": 12, "api_key": "k-123", "Authorization": "x"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "store slow now" and line["level"] == "warning" and line["logger"] == "tests.ops.logs"
    assert line["latency_ms"] == 12 and line["api_key"] == "[redacted]" and line["Authorization"] == "[redacted]"
    assert line["ts"].endswith("Z")


def test_access_lines_pass_through_untouched() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter("json"))
    access = logging.getLogger("kcr_trio.access")
    access.addHandler(handler)
    old = access.level
    access.setLevel(logging.INFO)
    try:
        access.info('{"event":"access","status":200}')
    finally:
        access.removeHandler(handler)
        access.setLevel(old)
    assert stream.getvalue() == '{"event":"access","status":200}\n'


def test_the_current_request_id_is_added() -> None:
    logger, stream, handler = capture()
    token = scope_module._REQUEST_ID.set("rid-123")
    try:
        logger.info("inside a request")
    finally:
        scope_module._REQUEST_ID.reset(token)
        logger.info("outside")
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "rid-123" and "request_id" not in outside


def test_structlog_loggers_share_the_stream(capsys) -> None:  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        structlog.get_logger("tests.ops").info("hello", code="print(secret)", n=1)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert line["event"] == "hello" and line["code"] == "[redacted]" and line["n"] == 1


def test_api_and_sidecar_write_the_same_ts_format(capsys) -> None:  # type: ignore[no-untyped-def]
    """One timestamp format across the fleet: ISO 8601 UTC with microseconds and a ``Z``."""
    from sidecar.runner import log as sidecar_log

    iso_utc = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    logger, stream, handler = capture()
    try:
        logger.info("api line")
    finally:
        logger.removeHandler(handler)
    api_ts = json.loads(stream.getvalue())["ts"]
    sidecar_log("sidecar_line", n=1)
    sidecar_ts = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["ts"]
    assert iso_utc.fullmatch(api_ts), api_ts
    assert iso_utc.fullmatch(sidecar_ts), sidecar_ts
