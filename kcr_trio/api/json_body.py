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

from .services import services, unauth_budget


async def read_body(limit: int) -> bytes:
    """The request's body: at most ``limit`` bytes (413), within the body timeout (408); a body read
    before its key is checked is bounded more tightly (``api/anonymous.py``). Every JSON route reads
    its body here (``/exec`` through :func:`read_json`, ``/exec/programmatic`` with its own parse)."""
    settings = services().settings
    chunks: list[bytes] = []
    size = 0
    # Not yet authenticated (the key is in the body): bounded per request and globally.
    budget = unauth_budget() if g.get("auth_pending") else None
    held = 0
    try:
        if budget is not None and (request.content_length or 0) > budget.per_request:
            raise budget.too_large()
        with trio.move_on_after(settings.kcr_body_timeout) as scope:
            async for chunk in request.body:
                if budget is not None:
                    budget.reserve(held, len(chunk))
                    held += len(chunk)
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"Request body too large: at most {limit} bytes")
    finally:
        if budget is not None:
            budget.release(held)
    if scope.cancelled_caught:
        raise ApiError("Request body timeout", status=408)
    return b"".join(chunks)  # one copy, as the bytearray it replaced


async def read_json(limit: int) -> Any:
    """The request's JSON body (:func:`read_body`), valid UTF-8 JSON without lone surrogates."""
    data = await read_body(limit)
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
