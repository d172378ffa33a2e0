"""The file routes (``api-contract.md`` §2): upload, listing, freshness, download and delete.

Handlers read and check the request, call the core, and send its answer. The storage rules (an
upload's "bytes first, metadata last", a delete's "metadata first") are ``core.files``; the JSON
shapes are built by ``core.wire_shapes``, which the OpenAPI document is generated from too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import trio
from quart import Response, request

from kcr_trio.core import wire_shapes
from kcr_trio.core.errors import ApiError, NotFound
from kcr_trio.core.files import Upload, store_uploads
from kcr_trio.core.files import delete_file as delete_stored_file
from kcr_trio.core.ids import is_safe_id
from kcr_trio.core.interfaces import SessionStore, Spooled
from kcr_trio.core.model import FileRecord, utcnow
from kcr_trio.core.names import content_disposition, guess_content_type

from .scope import current
from .services import json_response, request_user_id, services
from .uploads import ParsedForm, parse_multipart

# CORS for browser downloads, only when KCR_CORS_ORIGINS names origins (off by default, as in
# KubeCodeRun's ENABLE_CORS=false): LibreChat downloads server-side and needs none of it.
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "x-api-key, Content-Type",
    "Access-Control-Expose-Headers": "Content-Disposition",
}


def register(app: Any) -> None:
    app.add_url_rule("/upload", "upload", upload, methods=["POST"])
    app.add_url_rule("/upload/batch", "upload_batch", upload_batch, methods=["POST"])
    app.add_url_rule("/files/<session_id>", "list_files", list_files, methods=["GET"])
    app.add_url_rule("/sessions/<session_id>/objects/<file_id>", "freshness", freshness, methods=["GET"])
    # No automatic OPTIONS: the explicit route below answers the CORS preflight with 204.
    app.add_url_rule("/download/<session_id>/<file_id>", "download", download, methods=["GET"],
                     provide_automatic_options=False)
    app.add_url_rule("/download/<session_id>/<file_id>", "download_options", download_options,
                     methods=["OPTIONS"])
    app.add_url_rule("/files/<session_id>/<file_id>", "delete_file", delete_file, methods=["DELETE"])


def cors_headers(allowed: str, origin: str | None) -> dict[str, str]:
    """The CORS headers for a request from ``origin``, or none (CORS off or origin not allowed)."""
    origins = {o.strip() for o in allowed.split(",") if o.strip()}
    if "*" in origins:
        return {"Access-Control-Allow-Origin": "*", **CORS_HEADERS}
    if origin and origin in origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **CORS_HEADERS}
    return {}


# -- /upload --------------------------------------------------------------------------------------


async def upload() -> Response:
    form = await _parse_upload(batch=False)
    try:
        if not form.files:
            raise _no_files()
        session_id, stored = await _store_form(form)
    finally:
        form.cleanup()
    return json_response(wire_shapes.upload_response(session_id, stored))


async def upload_batch() -> Response:
    form = await _parse_upload(batch=True)
    try:
        if not form.files and not form.refused:
            raise _no_files()
        session_id, stored = await _store_form(form)
    finally:
        form.cleanup()
    return json_response(wire_shapes.batch_upload_response(session_id, stored, form.refused))


async def _parse_upload(batch: bool) -> ParsedForm:
    svc = services()
    settings = svc.settings
    with trio.move_on_after(settings.kcr_body_timeout) as scope:
        form = await parse_multipart(
            request.body,
            request.headers.get("content-type", ""),
            spool_dir=svc.spool_dir,
            max_file_bytes=settings.max_file_bytes,
            max_files=settings.max_files_per_session,
            refuse_oversize=not batch,
        )
    if scope.cancelled_caught:
        raise ApiError("Request body timeout", status=408)
    return form


async def _store_form(form: ParsedForm) -> tuple[str, list[FileRecord]]:
    svc = services()
    uploads = [
        Upload(item.filename, item.content_type, item.size, partial(_spooled, item.path, item.size, item.sha256))
        for item in form.files
    ]
    return await store_uploads(
        svc.sessions,
        svc.files,
        uploads,
        entity_id=(form.fields.get("entity_id") or "").strip() or None,
        owner=request_user_id(form.fields.get("user_id")),
        max_bytes=svc.settings.max_file_bytes,
    )


def _spooled(path: Path, size: int, sha256: str | None) -> AbstractAsyncContextManager[Spooled]:
    """The spool file itself, not its chunks: the store sends (S3) or links (local disk) it without
    a second copy. It stays in place until ``form.cleanup()``, after the store is done."""
    return nullcontext(Spooled(path, size, sha256))


def _no_files() -> ApiError:
    return ApiError(
        "No files provided",
        status=422,
        details=[{"field": "body -> file", "message": "Field required", "code": "missing"}],
    )


# -- listings, freshness --------------------------------------------------------------------------


async def list_files(session_id: str) -> Response:
    return json_response(await listing(services().sessions, session_id, request.args.get("detail", "full")))


async def listing(sessions: SessionStore, session_id: str, detail: str) -> list[Any]:
    """``GET /files/{session_id}``'s answer; also served below Quart by ``api.files_fast``."""
    if not is_safe_id(session_id):
        return []
    if detail == "summary":
        records, session = await sessions.list_files_and_session(session_id)
        now = utcnow()
        items = []
        for r in records:
            if session is not None and session.active:
                stamp = now
            elif session is not None:
                stamp = session.last_activity
            else:
                stamp = r.created_at
            items.append(wire_shapes.file_summary(session_id, r, stamp))
        return items
    records = await sessions.list_files(session_id)
    if detail == "simple":
        return [wire_shapes.file_simple(r) for r in records]
    return [wire_shapes.file_full(session_id, r) for r in records]


async def freshness(session_id: str, file_id: str) -> Response:
    record = await record_or_404(session_id, file_id)
    session = await services().sessions.get_session(session_id)
    stamp = utcnow() if session is not None and session.active else record.created_at
    return json_response(wire_shapes.freshness(session_id, record, stamp))


async def record_or_404(session_id: str, file_id: str) -> FileRecord:
    record = None
    if is_safe_id(session_id) and is_safe_id(file_id):
        record = await services().sessions.get_file(session_id, file_id)
    if record is None:
        raise NotFound("File not found")
    return record


# -- download, delete -----------------------------------------------------------------------------


# Stores hand out 64 KiB pieces; each piece sent on its own passes the channel, Quart's response
# loop, the request scope and Hypercorn/h11, a few task switches each. Joined to this size first,
# a 10 MB download costs a quarter of those trips (one copy of the bytes, far cheaper).
DOWNLOAD_SEND_BYTES = 256 * 1024


async def download(session_id: str, file_id: str) -> Response:
    svc = services()
    record = await record_or_404(session_id, file_id)
    rs = current(request.scope)
    send, receive = trio.open_memory_channel[tuple[str, Any]](1)

    async def produce() -> None:
        # Opens, reads and closes the object in one task, owned by the request.
        async with send:
            try:
                async with svc.files.open(record.object_key) as chunks:
                    await send.send(("open", None))
                    pending: list[bytes] = []
                    size = 0
                    async for chunk in chunks:
                        pending.append(chunk)
                        size += len(chunk)
                        if size >= DOWNLOAD_SEND_BYTES:
                            await send.send(("data", b"".join(pending)))
                            pending, size = [], 0
                    if pending:
                        await send.send(("data", b"".join(pending)))
            except ApiError as exc:
                await send.send(("error", exc))

    rs.nursery.start_soon(produce)
    kind, value = await receive.receive()
    if kind == "error":
        receive.close()
        raise value

    async def body() -> AsyncIterator[bytes]:
        async with receive:
            async for kind, value in receive:
                if kind == "error":
                    raise RuntimeError(f"download aborted: {value.message}")
                yield value

    headers = {
        "Content-Disposition": content_disposition(record.filename),
        "Cache-Control": "private, max-age=3600",
        "Content-Length": str(record.size),
        **cors_headers(svc.settings.kcr_cors_origins, request.headers.get("origin")),
    }
    return Response(body(), status=200, content_type=guess_content_type(record.filename, record.content_type),
                    headers=headers)


async def download_options(session_id: str, file_id: str) -> Response:
    cors = cors_headers(services().settings.kcr_cors_origins, request.headers.get("origin"))
    if not cors:
        return Response(b"", status=204, headers={"Allow": "GET, HEAD, OPTIONS"})
    return Response(b"", status=204, headers={**cors, "Access-Control-Max-Age": "3600"})


async def delete_file(session_id: str, file_id: str) -> Response:
    svc = services()
    record = await record_or_404(session_id, file_id)
    # Never half-applied (audit finding 8): ``core.files.delete_file`` changes nothing while the
    # file store is down (503, the file stays listed), then removes the metadata before the bytes.
    await delete_stored_file(svc.sessions, svc.files, record)
    return Response(b"", status=200)
