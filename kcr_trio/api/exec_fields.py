"""The newer ``/exec`` body fields LibreChat's agents 3.9.x send (contract §1.1, §4.3).

* ``args`` (``execute_code``, ``bash_tool``): the program's command-line arguments, passed as argv
  (never through a shell, so no quoting can change their meaning). Bounded in count and size, and
  NUL is refused (it cannot be in an argv string).
* ``timeout`` (the PTC fallback, ``tool_search``): **milliseconds** for this one run, applied as
  ``min(timeout, MAX_EXECUTION_TIME)``. Like the official server, a value that is not a positive
  number is a 400 with its message; it is never a 422 and never ignored silently.
"""

from __future__ import annotations

import math
from typing import Any

from kcr_trio.core.errors import ApiError

MAX_ARGS = 256
MAX_ARGS_BYTES = 64 * 1024


def _bad(field: str, message: str) -> ApiError:
    return ApiError(message, status=400, details=[{"field": f"body -> {field}", "message": message,
                                                   "code": f"invalid_{field}"}])


def parse_args(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad("args", "args must be an array of strings")
    if len(value) > MAX_ARGS:
        raise _bad("args", f"args may hold at most {MAX_ARGS} items")
    if sum(len(item.encode("utf-8", "surrogatepass")) for item in value) > MAX_ARGS_BYTES:
        raise _bad("args", f"args may hold at most {MAX_ARGS_BYTES} bytes in total")
    if any("\0" in item for item in value):
        raise _bad("args", "args must not contain NUL characters")
    return list(value)


def parse_timeout_ms(value: Any) -> float | None:
    """Seconds for this run (uncapped; the service applies ``MAX_EXECUTION_TIME``), or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad("timeout", "timeout must be a positive number of milliseconds")
    return float(value) / 1000.0
