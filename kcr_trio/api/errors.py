"""Error bodies in KubeCodeRun's two shapes (``api-contract.md`` §1.3), plus coded bodies.

LibreChat's agents 3.9.x classify an error by a machine code in ``error`` (contract §1.0.1): 429
``rate_limited`` with ``retry_after_seconds``, capability codes such as
``execution_profile_mismatch``. Those answers are ``CodedError``s: ``{"error": code, "message", ...}``.
The client reads an error body only up to 64 KiB, so every body is kept well under that.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kcr_trio.core.errors import ApiError
from kcr_trio.core.ids import new_id

MAX_ERROR_BODY = 32 * 1024  # the client ignores bodies over 64 KiB; stay far below
MAX_MESSAGE_CHARS = 4096


class CodedError(ApiError):
    """An error whose ``error`` is a machine code the client acts on (contract §1.0.1)."""

    def __init__(self, code: str, message: str, *, status: int, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        super().__init__(message, status=status, headers=headers, shape="A")
        self.code = code
        self.fields = fields


def error_body(exc: ApiError) -> dict[str, Any]:
    body = _body(exc)
    if len(dumps(body)) > MAX_ERROR_BODY:
        body["error"] = str(body["error"])[:MAX_MESSAGE_CHARS]
        if isinstance(body.get("message"), str):
            body["message"] = body["message"][:MAX_MESSAGE_CHARS]
        details = body.get("details")
        while isinstance(details, list) and details and len(dumps(body)) > MAX_ERROR_BODY:
            del details[max(1, len(details) // 2) if len(details) > 1 else 0 :]
    return body


def _body(exc: ApiError) -> dict[str, Any]:
    if isinstance(exc, CodedError):
        return {"error": exc.code, "message": exc.message, **exc.fields, "timestamp": time.time()}
    if exc.shape == "A":
        return {"error": exc.message, "timestamp": time.time()}
    return {
        "error": exc.message,
        "error_type": exc.error_type,
        "details": exc.details,
        "request_id": new_id(),
        "timestamp": time.time(),
    }


# Built once: ``json.dumps`` with any option builds a new encoder on every call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: Any) -> bytes:
    # "replace": a lone surrogate that slipped into a message must cost a "?", never the answer.
    return _encode(obj).encode("utf-8", "replace")
