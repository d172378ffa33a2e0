"""The OpenAPI 3.1 document for ``/openapi.json``, generated from the app's routes and pydantic models.

Why not ``quart-schema``: its request validation reads the body for the handler, and our handlers
read bodies themselves — streamed, with size limits and a body deadline, multipart spooled to disk —
which is the point of them. So the document is generated here instead:

* the **paths and methods** come from the live ``url_map`` (a route added without documentation is
  still listed, marked ``x-undocumented``, and the sync test in ``tests/integration/ops`` fails on it);
* the **schemas** come from pydantic: the request model the handlers validate with
  (``api.models.ExecBody``), the ``TypedDict`` shapes the file and exec handlers build their JSON
  from (``core.wire_shapes``: defined once, no model layer or re-encoding on the hot path), and a
  few edge-only models below (errors, health, readiness). The fuzz test (schemathesis) and the
  OpenAPI test check real responses against these schemas.

Error bodies: KubeCodeRun has two shapes (``api-contract.md`` §1.3). Both have ``error`` and
``timestamp``; shape B adds ``error_type``, ``details`` and ``request_id``. One ``Error`` schema with
the shape B fields optional describes both.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from kcr_trio.core import wire_shapes
from kcr_trio.core.languages import LANGUAGES

from .models import ExecBody


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    field: str
    message: str
    code: str


class Error(_Out):
    """Shape A (middleware errors: 401, 415), shape B (most others), or a coded body whose ``error``
    is a machine code (429 ``rate_limited``, 409 ``execution_profile_mismatch``, 400
    ``invalid_execution_profile``) with a readable ``message``."""

    error: str
    timestamp: float
    message: str | None = None
    retry_after_seconds: int | None = None
    expected_profile: str | None = None
    actual_profile: str | None = None
    error_type: str | None = None
    details: list[ErrorDetail] | None = None
    request_id: str | None = None


class HealthConfig(_Out):
    debug: bool
    docs_enabled: bool
    cors_enabled: bool


class Health(_Out):
    status: Literal["healthy"]
    version: str
    config: HealthConfig


class Check(_Out):
    ok: bool
    error: str | None = None
    latency_ms: float | None = None


class Ready(_Out):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]
    warnings: list[str] | None = None


# Request and edge-only response models; the file and exec answers' shapes are the ones the
# handlers build (``core.wire_shapes``), so the document describes exactly what is sent.
MODELS: list[type[BaseModel]] = [ExecBody, Error, Health, Ready]

# -- operations ----------------------------------------------------------------------------------

AUTH: list[dict[str, list[str]]] = [{"ApiKeyHeader": []}, {"BearerKey": []}]
SID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
FID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid input (unsupported language, empty code, malformed multipart)",
        401: "Missing or invalid API key (shape A)",
        404: "Not found",
        405: "Method not allowed",
        408: "The request body did not arrive within KCR_BODY_TIMEOUT",
        409: "X-CodeAPI-Expected-Profile names a profile this deployment does not serve "
             "(execution_profile_mismatch), or the runtime session stayed busy",
        413: "Body, code or file too large",
        415: "Unsupported content type",
        422: "Request validation failed",
        429: "Rate limited: {error: rate_limited, message, retry_after_seconds}, with Retry-After and "
             "X-RateLimit-* headers",
        503: "No execution capacity or a dependency unavailable (Retry-After when busy)",
        504: "The handler's deadline (KCR_REQUEST_TIMEOUT) passed",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


AUTHED = (401, 429)
MULTIPART = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "The file (LibreChat sends exactly this one part)"},
                    "entity_id": {"type": "string", "description": "Reuse this entity's active session"},
                },
                # Also accepted: repeated ``files`` parts instead of ``file`` (KubeCodeRun's tests use
                # them); left out of the schema, since multipart cannot type them apart from a field.
                "required": ["file"],
            }
        }
    },
}

_PTC_CALL = {"type": "object", "required": ["id", "name", "input"], "properties": {
    "id": {"type": "string", "pattern": "^call_\\d{3,6}$"}, "name": {"type": "string"}, "input": {}}}
_PTC_BODY = {"oneOf": [
    {"type": "object", "title": "First request", "required": ["code", "tools"], "properties": {
        "code": {"type": "string", "pattern": "\\S"},
        "tools": {"type": "array", "minItems": 1, "maxItems": 100, "items": {"type": "object", "required": ["name"],
                  "properties": {"name": {"type": "string", "pattern": "[A-Za-z0-9]"},
                                 "description": {"type": ["string", "null"]},
                                 "parameters": {"type": ["object", "null"]}}}},
        "lang": {"enum": ["python", "py", "bash", None]}, "language": {"enum": ["python", "py", "bash", None]},
        "timeout": {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "ms of run time, capped by MAX_EXECUTION_TIME"},
        "session_id": {"type": ["string", "null"]}, "files": {"type": ["array", "null"]},
        "runtime_session_hint": {"type": ["string", "null"]}}},
    {"type": "object", "title": "Continuation", "required": ["continuation_token", "tool_results"], "properties": {
        "continuation_token": {"type": "string", "minLength": 1},
        "tool_results": {"type": "array", "minItems": 1, "maxItems": 200, "uniqueItems": True, "items": {
            "type": "object", "required": ["call_id", "result"], "properties": {
                "call_id": {"type": "string", "pattern": "^call_[0-9]{3,6}$"}, "result": {}, "is_error": {"type": "boolean"},
                "error_message": {"type": ["string", "null"]}}}}}},
]}
_PTC_ANSWER = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["tool_call_required", "completed", "error"]},
    "continuation_token": {"type": "string"}, "tool_calls": {"type": "array", "items": _PTC_CALL},
    "stdout": {"type": "string"}, "stderr": {"type": "string"}, "error": {"type": "string"},
    "files": {"type": "array", "items": _ref("ExecFile")}, "session_id": {"type": "string"}}}


def _ptc_errors(**extra: str) -> dict[str, Any]:
    text = {"400": "Invalid request, token or tool results", "401": "Missing or invalid API key",
            "403": "The execution or request id belongs to another principal", **extra,
            "408": "The request body did not arrive within KCR_BODY_TIMEOUT", "415": "Unsupported content type",
            "413": "Body, a result or the execution state too large", "429": "Rate limited",
            "503": "The state store is unavailable, or no sandbox is free"}
    return {s: _json(_ref("Error"), t) for s, t in sorted(text.items())}


OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/exec/programmatic"): {
        "summary": "Programmatic tool calling: run code that calls the agent's tools",
        "description": "First request `{code, tools, timeout, ...}` or continuation `{continuation_token, "
        "tool_results}`. Answers `tool_call_required` (the run stays suspended in its sandbox until the "
        "results arrive; a continuation may reach any replica), `completed` or `error`. Header "
        "`X-LibreChat-Code-Request-ID` names the POST for cancel.",
        "security": AUTH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _PTC_BODY}}},
        "responses": {"200": _json(_PTC_ANSWER, "The next step of the execution"),
                      **_ptc_errors(**{"404": "Execution not found or expired",
                                       "409": "A continuation in progress, a different re-sent result, or a "
                                              "reused request id"})},
    },
    ("post", "/exec/programmatic/cancel"): {
        "summary": "Cancel the programmatic execution a POST started",
        "security": AUTH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["request_id"], "properties": {
                "request_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,128}$"}}}}}},
        "responses": {
            "200": _json({"type": "object", "properties": {"status": {"const": "already_completed"}}},
                         "That POST has already been answered"),
            "202": _json({"type": "object", "properties": {"status": {"const": "cancellation_requested"}}},
                         "Stopped (or remembered, if its POST has not arrived yet)"),
            **_ptc_errors(),
        },
    },
    ("post", "/exec"): {
        "summary": "Run code",
        "description": "Runs `code` once in a fresh sandbox. Slow runs commit 200 after a short grace "
        "and send spaces until the JSON is ready. The API key may also come in the body "
        "(`LIBRECHAT_CODE_API_KEY`, `api_key`, `apiKey`) when no header carries one. Also accepted: "
        "`timeout` (positive number of milliseconds, capped at MAX_EXECUTION_TIME; 400 otherwise) and "
        "`runtime_session_hint` (stateful profile only: 1-128 characters of `A-Za-z0-9._:-`, required "
        "there; ignored in the default profile). The `X-CodeAPI-Expected-Profile` header selects the "
        "profile (400 unknown, 409 not served).",
        "security": AUTH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ExecBody")}}},
        "responses": {"200": _json(_ref("ExecResponse"), "The run's result"),
                      **_errors(400, *AUTHED, 408, 409, 413, 415, 422, 503)},
    },
    ("post", "/upload"): {
        "summary": "Upload input file(s)",
        "security": AUTH,
        "requestBody": MULTIPART,
        "responses": {"200": {**_json(_ref("UploadResponse"), "Stored"), "links": {
                          "download": {"operationId": "get_download", "parameters": {
                              "session_id": "$response.body#/session_id",
                              "file_id": "$response.body#/files/0/fileId"}},
                          "list": {"operationId": "get_list_files", "parameters": {
                              "session_id": "$response.body#/session_id"}},
                          "freshness": {"operationId": "get_freshness", "parameters": {
                              "session_id": "$response.body#/session_id",
                              "file_id": "$response.body#/files/0/fileId"}},
                          "delete": {"operationId": "delete_delete_file", "parameters": {
                              "session_id": "$response.body#/session_id",
                              "file_id": "$response.body#/files/0/fileId"}}}},
                      **_errors(400, *AUTHED, 408, 413, 415, 422, 503, 504)},
    },
    ("post", "/upload/batch"): {
        "summary": "Upload several files, reporting each",
        "security": AUTH,
        "requestBody": MULTIPART,
        "responses": {"200": _json(_ref("BatchUploadResponse"), "Stored (some files may be refused)"),
                      **_errors(400, *AUTHED, 408, 413, 415, 422, 503, 504)},
    },
    ("get", "/files/{session_id}"): {
        "summary": "List a session's files",
        "security": AUTH,
        "parameters": [SID, {"name": "detail", "in": "query", "required": False,
                             "description": "`summary`, `simple`, or anything else for the full listing",
                             "schema": {"type": "string"}}],
        "responses": {
            "200": _json({"type": "array", "items": {"anyOf": [_ref("FileSummary"), _ref("FileSimple"),
                                                                _ref("FileFull")]}},
                         "Always 200; an unknown session lists nothing"),
            **_errors(*AUTHED, 503, 504),
        },
    },
    ("delete", "/files/{session_id}/{file_id}"): {
        "summary": "Delete a stored file",
        "security": AUTH,
        "parameters": [SID, FID],
        "responses": {"200": {"description": "Deleted (empty body)"}, **_errors(*AUTHED, 404, 503, 504)},
    },
    ("get", "/sessions/{session_id}/objects/{file_id}"): {
        "summary": "Freshness of a stored file (newer LibreChat)",
        "security": AUTH,
        "parameters": [SID, FID],
        "responses": {"200": _json(_ref("Freshness"), "The file's freshness"), **_errors(*AUTHED, 404, 503, 504)},
    },
    ("get", "/download/{session_id}/{file_id}"): {
        "summary": "Download a stored file",
        "security": AUTH,
        "parameters": [SID, FID],
        "responses": {
            "200": {"description": "The bytes; Content-Type from the stored type or the name",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(*AUTHED, 404, 503, 504),
        },
    },
    ("options", "/download/{session_id}/{file_id}"): {
        "summary": "CORS preflight for downloads",
        "parameters": [SID, FID],
        "responses": {"204": {"description": "CORS headers, no body"}},
    },
    ("get", "/health"): {
        "summary": "Process alive",
        "responses": {"200": _json(_ref("Health"), "Alive")},
    },
    ("get", "/ready"): {
        "summary": "Dependencies reachable and pools warm, with per-dependency detail",
        "responses": {"200": _json(_ref("Ready"), "Ready"), "503": _json(_ref("Ready"), "Not ready")},
    },
    ("get", "/metrics"): {
        "summary": "Prometheus metrics",
        "description": "Needs an API key unless KCR_METRICS_AUTH=false; absent when KCR_METRICS_PORT "
        "serves metrics on a separate port.",
        "security": AUTH,
        "responses": {"200": {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **_errors(*AUTHED)},
    },
    ("get", "/openapi.json"): {
        "summary": "This document",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
    },
    ("get", "/docs"): {
        "summary": "Interactive documentation",
        "responses": {"200": {"description": "HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}},
    },
}

_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>")


def openapi_path(rule: str) -> str:
    """``/files/<session_id>`` → ``/files/{session_id}``."""
    return _CONVERTER.sub(r"{\1}", rule)


def _component_schemas() -> dict[str, Any]:
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
        (m.__name__, "validation" if m is ExecBody else "serialization", TypeAdapter(m)) for m in MODELS
    ]
    inputs += [(shape.__name__, "serialization", TypeAdapter(shape)) for shape in wire_shapes.SHAPES]
    _, defs = TypeAdapter.json_schemas(inputs, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = defs.get("$defs", {})
    schemas["FileSummary"]["properties"]["name"]["description"] = '"<session_id>/<file_id>"'
    body = schemas["ExecBody"]
    # What the server accepts, said so a client (and the fuzzer) can produce it: a supported
    # language (matched case-insensitively), code that is not blank.
    body["properties"]["lang"] = {"type": "string", "enum": sorted(LANGUAGES),
                                  "description": "Language code, case-insensitive"}
    body["properties"]["code"] = {"type": "string", "pattern": r"\S",
                                  "description": "Program text; at most KCR_MAX_CODE_BYTES bytes"}
    body["properties"]["args"] = {
        "anyOf": [{"type": "array", "items": {"type": "string", "pattern": "^[^\\x00]*$"}, "maxItems": 256},
                  {"type": "null"}],
        "description": "The program's command-line arguments (argv); at most 64 KiB in total"}
    # ``timeout`` (ms) and ``runtime_session_hint`` are described in the operation's text instead:
    # as schema properties they steer the fuzzer into runs that time out at once, which starves
    # its stateful phase of the files the freshness and delete routes need.
    body["properties"].pop("timeout", None)
    body["properties"].pop("runtime_session_hint", None)
    return schemas


def openapi_document(app: Any, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = openapi_path(rule.rule)
        methods = set(rule.methods or ()) - {"HEAD"}
        explicit_options = "OPTIONS" in methods and not rule.provide_automatic_options
        if not explicit_options:
            methods.discard("OPTIONS")
        for method in sorted(m.lower() for m in methods):
            operation = OPERATIONS.get((method, path))
            if operation is None:
                operation = {"summary": rule.endpoint, "x-undocumented": True,
                             "responses": {"default": {"description": "undocumented"}}}
            paths.setdefault(path, {})[method] = {"operationId": f"{method}_{rule.endpoint}", **operation}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kcr-trio: LibreChat Code Interpreter API",
            "version": version,
            "description": "Wire-compatible with KubeCodeRun. Errors use KubeCodeRun's two body shapes.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": _component_schemas(),
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerKey": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def docs_page(spec_url: str) -> bytes:
    """A Swagger UI page for the document (the UI's assets come from a CDN, as FastAPI's do)."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kcr-trio API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: {json.dumps(spec_url)}, dom_id: "#ui"}});</script>
<noscript>The OpenAPI document is at <a href="{spec_url}">{spec_url}</a>.</noscript>
</body></html>""".encode()
