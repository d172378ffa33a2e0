"""The JSON shapes the file and exec answers put on the wire, defined once.

Each shape is a ``TypedDict`` plus the one function that builds it from the core's records. The
handlers and ``core.exec`` send what these functions return (plain dicts, encoded once, no model
layer on the hot path), and ``api.openapi`` derives the document's response schemas from the same
``TypedDict``s, so the document cannot drift from what is sent (the OpenAPI test validates real
answers against it).

Key order is the order the builders write (it is what clients and snapshot-style tests see), and a
key is either always present (``null`` when empty, as KubeCodeRun sends it) or ``NotRequired``
(sent only when it says something): see ``api-contract.md`` §2.1–§2.3 and the newer fields of §8.

``typing_extensions.TypedDict``: pydantic (which builds the OpenAPI schemas) needs it on Python 3.11.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

from .model import FileRecord
from .names import sanitize_filename

# -- /exec ----------------------------------------------------------------------------------------


class ExecFile(TypedDict):
    """A generated file: ``GET /download/{session_id}/{id}`` fetches it. ``path`` is always ``null``
    (KubeCodeRun's shape); ``session_id``/``storage_session_id`` name where it is stored (§8)."""

    id: str
    name: str
    path: None
    session_id: str
    storage_session_id: str


class ArtifactDelivery(TypedDict):
    """Contract §4.1: outputs produced but not stored (``attempted == delivered + failed``)."""

    code: Literal["artifact_delivery_failed"]
    status: Literal["partial", "failed"]
    attempted: int
    delivered: int
    failed: int


class ExecResponse(TypedDict):
    """Program failures and timeouts are 200s too, with the text in ``stderr``. A slow run's body
    starts with spaces (heartbeat, ``keepalive.md``): still valid JSON. ``deleted_files``,
    ``artifact_delivery`` and the runtime session fields appear only when they say something."""

    session_id: str
    files: list[ExecFile]
    stdout: str
    stderr: str
    has_state: bool
    state_size: int | None
    state_hash: str | None
    deleted_files: NotRequired[list[str]]
    artifact_delivery: NotRequired[ArtifactDelivery]
    runtime_session_id: NotRequired[str]
    runtime_status: NotRequired[Literal["new", "reused"] | None]


def exec_file(record: FileRecord) -> ExecFile:
    return {
        "id": record.file_id,
        "name": record.filename,
        "path": None,
        "session_id": record.session_id,
        "storage_session_id": record.session_id,
    }


def artifact_delivery(attempted: int, delivered: int) -> ArtifactDelivery | None:
    """Contract §4.1: outputs produced but not stored, in the only shape the client accepts
    (``failed > 0``, ``attempted == delivered + failed``, ``failed`` ⇒ ``delivered == 0``,
    ``partial`` ⇒ ``delivered > 0``); ``None`` (field omitted) when every file was delivered."""
    delivered = max(0, min(delivered, attempted))
    failed = attempted - delivered
    if failed <= 0:
        return None
    return {"code": "artifact_delivery_failed", "status": "partial" if delivered else "failed",
            "attempted": attempted, "delivered": delivered, "failed": failed}


# -- /upload --------------------------------------------------------------------------------------


class UploadedFile(TypedDict):
    """LibreChat reads ``fileId`` (and keeps ``<session_id>/<fileId>``)."""

    filename: str
    fileId: str
    size: int
    content_type: str


class UploadResponse(TypedDict):
    message: Literal["success"]
    session_id: str
    storage_session_id: str
    files: list[UploadedFile]


class BatchFileResult(TypedDict):
    """One file of ``/upload/batch``: ``fileId`` when stored, ``error`` when refused."""

    status: Literal["success", "error"]
    fileId: NotRequired[str]
    filename: str
    error: NotRequired[str]


class BatchUploadResponse(TypedDict):
    message: Literal["success", "partial"]
    session_id: str
    storage_session_id: str
    files: list[BatchFileResult]
    succeeded: int
    failed: int


def upload_response(session_id: str, stored: list[FileRecord]) -> UploadResponse:
    return {
        "message": "success",
        "session_id": session_id,
        "storage_session_id": session_id,
        "files": [
            {"filename": r.filename, "fileId": r.file_id, "size": r.size, "content_type": r.content_type}
            for r in stored
        ],
    }


def batch_upload_response(
    session_id: str, stored: list[FileRecord], refused: list[tuple[str, str]]
) -> BatchUploadResponse:
    """``refused``: ``(raw filename, reason)`` of the parts a per-file limit turned away."""
    results: list[BatchFileResult] = [
        {"status": "success", "fileId": r.file_id, "filename": r.filename} for r in stored
    ]
    results += [
        {"status": "error", "filename": sanitize_filename(name), "error": reason} for name, reason in refused
    ]
    return {
        "message": "success" if not refused else "partial",
        "session_id": session_id,
        "storage_session_id": session_id,
        "files": results,
        "succeeded": len(stored),
        "failed": len(refused),
    }


# -- /files, /sessions/.../objects ----------------------------------------------------------------


class FileSummary(TypedDict):
    """``detail=summary``: what LibreChat's freshness check reads (``name`` is
    ``"<session_id>/<file_id>"``)."""

    name: str
    lastModified: str


class FileSimple(TypedDict):
    id: str
    name: str
    path: str


FileMetadata = TypedDict("FileMetadata", {"content-type": str, "original-filename": str})


class FileFull(TypedDict):
    """The default listing (KubeCodeRun's ``full``): ``name`` is the sanitised filename and
    ``lastModified`` Python's ``isoformat()`` (contract §2.3, §4.6)."""

    name: str
    id: str
    session_id: str
    content: None
    size: int
    lastModified: str
    etag: str
    metadata: FileMetadata
    contentType: str


class Freshness(TypedDict):
    lastModified: str
    session_id: str
    storage_session_id: str
    file_id: str
    name: str
    size: int


def iso_ms(stamp: dt.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` (contract §4.6, the summary form)."""
    # isoformat truncates to milliseconds as the strftime form did, at about half its cost.
    return stamp.astimezone(dt.UTC).isoformat(timespec="milliseconds")[:23] + "Z"


def file_summary(session_id: str, record: FileRecord, stamp: dt.datetime) -> FileSummary:
    return {"name": f"{session_id}/{record.file_id}", "lastModified": iso_ms(stamp)}


def file_simple(record: FileRecord) -> FileSimple:
    return {"id": record.file_id, "name": sanitize_filename(record.filename), "path": record.path}


def file_full(session_id: str, record: FileRecord) -> FileFull:
    name = sanitize_filename(record.filename)
    return {
        "name": name,
        "id": record.file_id,
        "session_id": session_id,
        "content": None,
        "size": record.size,
        "lastModified": record.created_at.isoformat(),
        "etag": f'"{record.file_id}"',
        "metadata": {"content-type": record.content_type, "original-filename": name},
        "contentType": record.content_type,
    }


def freshness(session_id: str, record: FileRecord, stamp: dt.datetime) -> Freshness:
    return {
        "lastModified": iso_ms(stamp),
        "session_id": session_id,
        "storage_session_id": session_id,
        "file_id": record.file_id,
        "name": record.filename,
        "size": record.size,
    }


# The response shapes ``api.openapi`` documents, by component name.
SHAPES: tuple[Any, ...] = (
    ExecResponse, UploadResponse, BatchUploadResponse, FileSummary, FileSimple, FileFull, Freshness,
)
