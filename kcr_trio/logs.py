"""Structured logs: one JSON object per line on stderr, rendered by ``structlog``.

Two paths, on purpose:

* **The access log** (logger ``kcr_trio.access``, one line per request, see ``api.scope``) is built as
  JSON by the request scope and written through untouched. It is the only line on the hot path, and
  the design budget forbids formatter chains there (Quart-Trio serves ~1.3k req/s on two cores).
* **Everything else** — our modules, Hypercorn, the backends — goes through structlog's processor
  chain: level, logger, timestamp, the current request id (from ``api.scope``'s context variable,
  which Trio copies into every task the request starts), ``extra=`` fields, and a redaction pass.

Redaction is a safety net, not the plan: we never log request bodies, headers or file contents. Any
field whose name looks like a credential or payload (``api_key``, ``authorization``, ``code``,
``content``, …) is replaced by ``"[redacted]"``, and key-shaped values of known header names inside
messages are not produced by our code in the first place. ``tests/integration/ops`` greps captured
logs for the key, the body and the file contents to prove it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from kcr_trio.api.scope import current_request_id
from kcr_trio.log_stream import ACCESS_LOGGER, BatchingStreamHandler

__all__ = ["ACCESS_LOGGER", "JsonFormatter", "LogFormatter", "setup_logging"]
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# Field names never written with their value (compared lower-cased, '-' as '_').
SENSITIVE_FIELDS = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "librechat_code_api_key",
        "authorization",
        "password",
        "secret",
        "token",
        "code",
        "content",
        "body",
        "data",
        "headers",
    }
)
REDACTED = "[redacted]"


def _request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if "request_id" not in event:
        rid = current_request_id()
        if rid is not None:
            event["request_id"] = rid
    return event


def _extras(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Copy ``logging`` ``extra=`` fields from the stdlib record into the event."""
    record = event.get("_record")
    if record is not None:
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in event:
                event[key] = value
    return event


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower().replace("-", "_") in SENSITIVE_FIELDS:
            event[key] = REDACTED
    return event


class LogFormatter(structlog.stdlib.ProcessorFormatter):
    """structlog for every record, except access lines, which are already JSON."""

    def __init__(self, fmt: str = "json") -> None:
        renderer: Any = (
            structlog.processors.JSONRenderer(default=str, separators=(",", ":"))
            if fmt == "json"
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        self._passthrough = fmt == "json"
        super().__init__(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                _extras,
                _request_id,
                redact,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )

    def format(self, record: logging.LogRecord) -> str:
        if self._passthrough and record.name == ACCESS_LOGGER:
            return record.getMessage()
        return super().format(record)


# Kept for callers that imported the old names.
JsonFormatter = LogFormatter


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route stdlib logging (ours and the libraries') and structlog loggers to one JSON stream."""
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _request_id,
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Access lines share a write while the server's flusher runs (``log_stream``).
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every sidecar call at INFO: two or three lines per /exec that the access line
    # already accounts for. Keep them for DEBUG.
    if root.level > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
