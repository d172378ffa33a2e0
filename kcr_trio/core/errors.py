"""Errors the core raises, each knowing the HTTP answer it deserves.

The edge turns an ``ApiError`` into one of KubeCodeRun's two body shapes (``api-contract.md`` §1.3):
shape A ``{"error", "timestamp"}`` for what KubeCodeRun's middleware answers (401, 415, 429, 413 on
the body-auth path) and shape B ``{"error", "error_type", "details", "request_id", "timestamp"}``
for everything else. Anything that is not an ``ApiError`` is a bug and becomes a shape B 500 without
a trace in the body.
"""

from __future__ import annotations

from typing import Any, Literal

import trio

_TYPE_BY_STATUS = {
    400: "validation",
    401: "authentication",
    403: "authorization",
    404: "resource_not_found",
    405: "validation",
    408: "timeout",
    409: "resource_conflict",
    413: "resource_exhausted",
    415: "validation",
    422: "validation",
    431: "validation",
    429: "rate_limited",
    502: "external_service",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error with an HTTP status, a readable message and optional field details."""

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        shape: Literal["A", "B"] = "B",
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers or {}
        self.shape = shape
        self.error_type = error_type or _TYPE_BY_STATUS.get(self.status, "internal_server")


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, shape="A")


class NotFound(ApiError):
    status = 404


class TooLarge(ApiError):
    status = 413


class Unavailable(ApiError):
    """A dependency (store, executor) cannot serve now; the client may retry."""

    status = 503

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
        super().__init__(message, headers=headers)


class Busy(Unavailable):
    """No execution capacity freed up within the configured wait."""


def unsupported_language(lang: str) -> BadRequest:
    return BadRequest(
        f"Unsupported programming language: {lang}",
        details=[
            {
                "field": "lang",
                "message": f"Language '{lang}' is not supported",
                "code": "unsupported_language",
            }
        ],
    )


def empty_code() -> BadRequest:
    return BadRequest(
        "Code cannot be empty",
        details=[{"field": "code", "message": "Code cannot be empty", "code": "empty_code"}],
    )


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one meaningful error inside a nursery's exception group.

    Trio wraps even a single failure in a group; the edge wants the ``ApiError`` itself. Cancelled
    is never returned from here (the enclosing scope handles it): we prefer an ApiError, then any
    other non-Cancelled exception, and otherwise give the group back untouched.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if any(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return group
    for leaf in leaves:
        if isinstance(leaf, ApiError):
            return leaf
    if len(leaves) == 1:
        return leaves[0]
    return group
