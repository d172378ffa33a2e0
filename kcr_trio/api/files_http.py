"""The file routes (``api-contract.md`` §2): upload, listing, freshness, download and delete.

Handlers read and check the request, call the stores, and shape the answer. The one piece of domain
logic still here, storing an upload ("bytes first, metadata last"), is :func:`store_uploads`, a
plain function of the stores, kept apart from the handlers so it can move into the core as is.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Response, request

from kcr_trio.core.errors import ApiError, NotFound
from kcr_trio.core.ids import is_safe_id, new_id
from kcr_trio.core.interfaces import FileStore, SessionStore
from kcr_trio.core.model import FileRecord, utcnow
from kcr_trio.core.names import content_disposition, guess_content_type, sanitize_filename

from .scope import current
from .services import json_response, request_user_id, services
from .uploads import ParsedForm, parse_multipart, spooled_chunks

log = logging.getLogger("kcr_trio.api")

# CORS for browser downloads, only when KCR_CORS_ORIGINS names origins (off by default, as in
# KubeCodeRun's ENABLE_CORS=false): LibreChat downloads server-side and needs none of it.
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "x-api-key, Content-Type",
    "Access-Control-Expose-Headers": "Content-Disposition",
}
# Undoing a failed or cancelled upload (shielded: it runs while the request is being cancelled) may
# take this long at most; what a dead store keeps past it has no metadata, so nobody sees it, and
# the orphan sweeper removes the bytes later.
UPLOAD_CLEANUP_TIMEOUT = 5.0


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
    return json_response(
        {
            "message": "success",
            "session_id": session_id,
            "storage_session_id": session_id,
            "files": [
                {"filename": r.filename, "fileId": r.file_id, "size": r.size, "content_type": r.content_type}
                for r in stored
            ],
        }
    )


async def upload_batch() -> Response:
    form = await _parse_upload(batch=True)
    try:
        if not form.files and not form.refused:
            raise _no_files()
        session_id, stored = await _store_form(form)
    finally:
        form.cleanup()
    results = [{"status": "success", "fileId": r.file_id, "filename": r.filename} for r in stored]
    results += [
        {"status": "error", "filename": sanitize_filename(name), "error": reason} for name, reason in form.refused
    ]
    return json_response(
        {
            "message": "success" if not form.refused else "partial",
            "session_id": session_id,
            "storage_session_id": session_id,
            "files": results,
            "succeeded": len(stored),
            "failed": len(form.refused),
        }
    )


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
    return await store_uploads(
        svc.sessions,
        svc.files,
        form,
        entity_id=(form.fields.get("entity_id") or "").strip() or None,
        owner=request_user_id(form.fields.get("user_id")),
        max_file_bytes=svc.settings.max_file_bytes,
    )


async def store_uploads(
    sessions: SessionStore,
    files: FileStore,
    form: ParsedForm,
    *,
    entity_id: str | None,
    owner: str | None,
    max_file_bytes: int,
) -> tuple[str, list[FileRecord]]:
    """Store a parsed form's files in the entity's session (or a new one): bytes first, metadata
    last, so a file is listed only once all of it is stored; on any failure or cancellation, undo
    what was stored (shielded, bounded). Returns the session id and the stored records."""
    session = await sessions.find_entity_session(entity_id) if entity_id else None
    if session is None:
        session = await sessions.create_session(entity_id=entity_id, user_id=owner)
    stored: list[FileRecord] = []
    try:
        for item in form.files:
            record = FileRecord(
                session_id=session.session_id,
                file_id=new_id(),
                filename=sanitize_filename(item.filename),
                content_type=item.content_type,
                size=item.size,
                created_at=utcnow(),
                kind="upload",
                owner=owner,
            )
            record.size = await files.put(
                record.object_key,
                spooled_chunks(item.path),
                content_type=record.content_type,
                max_bytes=max_file_bytes,
            )
            stored.append(record)
        for record in stored:  # metadata last: the files become visible only now
            await sessions.add_file(record)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(UPLOAD_CLEANUP_TIMEOUT):
            for record in stored:
                await sessions.delete_file(record.session_id, record.file_id)
                await files.delete(record.object_key)
        raise
    return session.session_id, stored


def _no_files() -> ApiError:
    return ApiError(
        "No files provided",
        status=422,
        details=[{"field": "body -> file", "message": "Field required", "code": "missing"}],
    )


# -- listings, freshness --------------------------------------------------------------------------


async def list_files(session_id: str) -> Response:
    sessions = services().sessions
    detail = request.args.get("detail", "full")
    if not is_safe_id(session_id):
        return json_response([])
    records = await sessions.list_files(session_id)
    if detail == "summary":
        session = await sessions.get_session(session_id)
        now = utcnow()
        items = []
        for r in records:
            if session is not None and session.active:
                stamp = now
            elif session is not None:
                stamp = session.last_activity
            else:
                stamp = r.created_at
            items.append({"name": f"{session_id}/{r.file_id}", "lastModified": _iso_ms(stamp)})
        return json_response(items)
    if detail == "simple":
        return json_response(
            [{"id": r.file_id, "name": sanitize_filename(r.filename), "path": r.path} for r in records]
        )
    return json_response(
        [
            {
                "name": sanitize_filename(r.filename),
                "id": r.file_id,
                "session_id": session_id,
                "content": None,
                "size": r.size,
                "lastModified": r.created_at.isoformat(),
                "etag": f'"{r.file_id}"',
                "metadata": {
                    "content-type": r.content_type,
                    "original-filename": sanitize_filename(r.filename),
                },
                "contentType": r.content_type,
            }
            for r in records
        ]
    )


async def freshness(session_id: str, file_id: str) -> Response:
    record = await record_or_404(session_id, file_id)
    session = await services().sessions.get_session(session_id)
    stamp = utcnow() if session is not None and session.active else record.created_at
    return json_response(
        {
            "lastModified": _iso_ms(stamp),
            "session_id": session_id,
            "storage_session_id": session_id,
            "file_id": file_id,
            "name": record.filename,
            "size": record.size,
        }
    )


async def record_or_404(session_id: str, file_id: str) -> FileRecord:
    record = None
    if is_safe_id(session_id) and is_safe_id(file_id):
        record = await services().sessions.get_file(session_id, file_id)
    if record is None:
        raise NotFound("File not found")
    return record


def _iso_ms(stamp: dt.datetime) -> str:
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


# -- download, delete -----------------------------------------------------------------------------


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
                    async for chunk in chunks:
                        await send.send(("data", chunk))
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
    # Never half-applied (audit finding 8): with the file store down, change nothing (503, the
    # file stays listed). Then metadata first, so readers stop seeing the file at once; bytes
    # a failing delete leaves behind have no metadata and the orphan sweeper removes them.
    await svc.files.ping()
    await svc.sessions.delete_file(session_id, file_id)
    try:
        await svc.files.delete(record.object_key)
    except ApiError as exc:
        log.warning("delete: bytes left for the orphan sweeper: %s", exc.message,
                    extra={"file_session": session_id, "file_id": file_id})
    return Response(b"", status=200)
