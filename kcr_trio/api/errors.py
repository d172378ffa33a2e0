"""Error bodies in KubeCodeRun's two shapes (``api-contract.md`` §1.3)."""

from __future__ import annotations

import json
import time
from typing import Any

from kcr_trio.core.errors import ApiError
from kcr_trio.core.ids import new_id


def error_body(exc: ApiError) -> dict[str, Any]:
    if exc.shape == "A":
        return {"error": exc.message, "timestamp": time.time()}
    return {
        "error": exc.message,
        "error_type": exc.error_type,
        "details": exc.details,
        "request_id": new_id(),
        "timestamp": time.time(),
    }


def dumps(obj: Any) -> bytes:
    # "replace": a lone surrogate that slipped into a message must cost a "?", never the answer.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
