"""A JSON request body, read as the edge must: bounded in size and time, refused cleanly.

The body is streamed (``request.body``) so the size limit holds while it arrives, under the body
timeout (408). A body read before its key is checked (the key travels in it) is bounded more tightly,
per request and across all such requests (``api/anonymous.py``). Bad UTF-8, bad JSON, over-long
integers, nesting too deep and lone surrogates are the client's input: 422 with the field, never 500.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from quart import g, request

from kcr_trio.core.errors import ApiError, TooLarge

from .anonymous import UnauthBudget
from .services import services, unauth_budget


class BodyLimits:
    """The bounds a JSON body is read under, chunk by chunk, whoever reads it: the Quart routes
    (:func:`read_body`) and the plain ASGI ``/exec`` (``api.exec_fast``) count the same way.

    ``budget``: the app's budget for bodies read before their key is checked (``None`` once the
    caller is authenticated). :meth:`close` gives back what was reserved; call it in ``finally``.
    """

    __slots__ = ("budget", "held", "limit", "size")

    def __init__(self, limit: int, budget: UnauthBudget | None) -> None:
        self.limit = limit
        self.budget = budget
        self.size = 0
        self.held = 0

    def announced(self, content_length: int | None) -> None:
        """413 at once for an unauthenticated body announced larger than its bound."""
        if self.budget is not None and (content_length or 0) > self.budget.per_request:
            raise self.budget.too_large()

    def add(self, chunk: bytes) -> None:
        """Count a chunk that arrived: over a bound is 413 (or the budget's 503)."""
        if self.budget is not None:
            self.budget.reserve(self.held, len(chunk))
            self.held += len(chunk)
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(f"Request body too large: at most {self.limit} bytes")

    def close(self) -> None:
        if self.budget is not None:
            self.budget.release(self.held)
            self.held = 0


def body_timeout() -> ApiError:
    return ApiError("Request body timeout", status=408)


async def read_body(limit: int) -> bytes:
    """The request's body: at most ``limit`` bytes (413), within the body timeout (408); a body read
    before its key is checked is bounded more tightly (``api/anonymous.py``). Every JSON route reads
    its body here (``/exec`` through :func:`read_json`, ``/exec/programmatic`` with its own parse)."""
    settings = services().settings
    chunks: list[bytes] = []
    # Not yet authenticated (the key is in the body): bounded per request and globally.
    bounds = BodyLimits(limit, unauth_budget() if g.get("auth_pending") else None)
    try:
        bounds.announced(request.content_length)
        with trio.move_on_after(settings.kcr_body_timeout) as scope:
            async for chunk in request.body:
                bounds.add(chunk)
                chunks.append(chunk)
    finally:
        bounds.close()
    if scope.cancelled_caught:
        raise body_timeout()
    return b"".join(chunks)  # one copy, as the bytearray it replaced


async def read_json(limit: int) -> Any:
    """The request's JSON body (:func:`read_body`), valid UTF-8 JSON without lone surrogates."""
    return parse_json(await read_body(limit))


def parse_json(data: bytes) -> Any:
    """``data`` as JSON: valid UTF-8 JSON without lone surrogates, else 422 with the field."""
    try:
        value = json.loads(data.decode("utf-8"))
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 consumer (the sidecar,
        # the stores, our own responses) can encode: refuse them here, with the field.
        if (b"\\ud" in data or b"\\uD" in data) and (where := _lone_surrogate(value, "body")):
            raise ApiError(
                "Request validation failed",
                status=422,
                details=[{"field": where, "message": "Lone surrogate in string", "code": "string_unicode"}],
            )
        return value
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError deeply
        # nested arrays. All are the client's input, so 422, never a 500.
        if isinstance(exc, RecursionError):
            exc = ValueError("nested too deeply")
        raise ApiError(
            "Request validation failed",
            status=422,
            details=[{"field": "body", "message": f"Invalid JSON: {exc}", "code": "json_invalid"}],
        ) from None


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The location (``body -> files -> 0 -> id``) of the first string holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key, where) is not None:
            return where
        found = _lone_surrogate(item, f"{where} -> {key}")
        if found is not None:
            return found
    return None
