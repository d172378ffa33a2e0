"""A benchmark peer shaped like KubeCodeRun 3.3.3's file routes, on FastAPI + uvicorn (httptools, uvloop).

KubeCodeRun itself is not on the package index, so the HTTP-cost benchmark (``kcr-trio bench
--scenario http-cost``) measures kcr-trio against this stand-in, built the way KubeCodeRun's handlers
work (read from its public source; written here from that description, not copied):

* ``GET /health``: a small JSON dict (status, version, timestamp, service), no authentication.
* KubeCodeRun's middleware stack, in its order: a metrics middleware on Starlette's
  ``BaseHTTPMiddleware`` (one record per request into an in-memory collector), a plain-ASGI request
  logger (one structlog JSON line per request but ``/health``), and a plain-ASGI security layer:
  security headers, and for every route but ``/health`` the API-key check, which asks Redis for the
  client IP's failure count and for a managed-key record (a miss: the key is the configured
  ``API_KEY``), as KubeCodeRun's auth service does. uvicorn's access log is on, as with
  KubeCodeRun's default ``LOG_LEVEL=INFO``.
* ``POST /upload``: FastAPI ``UploadFile`` (python-multipart, Starlette's spooled temp file), the
  whole part read into memory, stored with the synchronous ``minio`` client in the default thread
  pool (``put_object`` from a ``BytesIO``), metadata as a Redis hash plus a per-session set.
* ``GET /files/{sid}?detail=summary``: ``SMEMBERS`` then one ``HGETALL`` per file, sorted by time.
* ``GET /download/{sid}/{fid}``: ``HGETALL``, the whole object read in a thread, then a
  ``StreamingResponse`` yielding 8 KiB slices (chunked, no Content-Length).
* ``DELETE /files/{sid}/{fid}``: object, then metadata (the bench deletes what it uploaded).

One worker, redis-py's asyncio client. Run it with::

    python -m tests.support.http_peer --port 8002   # env: REDIS_URL, MINIO_ENDPOINT, MINIO_ACCESS_KEY,
                                                    #      MINIO_SECRET_KEY, MINIO_BUCKET, API_KEY

Needs the ``bench-peer`` extra (fastapi, uvicorn, httptools, uvloop, python-multipart, minio); it is
not part of kcr-trio's runtime dependencies.
"""


import argparse
import asyncio
import hashlib
import io
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar


def _new_id() -> str:
    return secrets.token_urlsafe(15).replace("-", "a").replace("_", "b")[:21]


def build_app() -> Any:
    import redis.asyncio as aioredis
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import Response, StreamingResponse
    from minio import Minio

    api_key = os.environ.get("API_KEY", "")
    bucket = os.environ.get("MINIO_BUCKET", "kubecoderun-files")
    minio = Minio(
        os.environ["MINIO_ENDPOINT"],
        access_key=os.environ.get("MINIO_ACCESS_KEY"),
        secret_key=os.environ.get("MINIO_SECRET_KEY"),
        secure=os.environ.get("MINIO_SECURE", "false") == "true",
        region=os.environ.get("MINIO_REGION", "us-east-1"),
    )
    redis = aioredis.from_url(os.environ["REDIS_URL"], decode_responses=True, max_connections=20)
    prefix = "peer:"

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, minio.bucket_exists, bucket):
            await loop.run_in_executor(None, minio.make_bucket, bucket)
        yield
        await redis.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def metadata(session_id: str, file_id: str) -> dict[str, Any] | None:
        meta: dict[str, Any] = await redis.hgetall(f"{prefix}files:{session_id}:{file_id}")
        if not meta:
            return None
        meta["size"] = int(meta.get("size", 0))
        meta["created_at"] = datetime.fromisoformat(meta["created_at"])
        return meta

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy", "version": "peer", "timestamp": datetime.now(UTC).isoformat(),
                "service": "kubecoderun-api"}

    @app.post("/upload")
    async def upload(file: UploadFile | None = File(None),  # noqa: B008  # FastAPI's own idiom
                     entity_id: str | None = Form(None)) -> dict[str, Any]:
        if file is None:
            raise HTTPException(status_code=422, detail="No files provided")
        if file.size and file.size > 10 * 1024 * 1024:
            raise HTTPException(status_code=413, detail="File too large")
        session_id, file_id = _new_id(), _new_id()
        content = await file.read()
        key = f"sessions/{session_id}/uploads/{file_id}"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, minio.put_object, bucket, key, io.BytesIO(content), len(content))
        meta = {"file_id": file_id, "filename": file.filename or "", "object_key": key,
                "content_type": file.content_type or "application/octet-stream", "session_id": session_id,
                "created_at": datetime.now(UTC).isoformat(), "size": len(content), "path": f"/{file.filename}"}
        await redis.hset(f"{prefix}files:{session_id}:{file_id}", mapping=meta)
        await redis.sadd(f"{prefix}session_files:{session_id}", file_id)
        return {"message": "success", "session_id": session_id,
                "files": [{"filename": file.filename, "fileId": file_id}]}

    @app.get("/files/{session_id}")
    async def list_files(session_id: str, detail: str | None = None) -> list[dict[str, Any]]:
        ids = await redis.smembers(f"{prefix}session_files:{session_id}")
        found = [m for m in [await metadata(session_id, i) for i in ids] if m is not None]
        found.sort(key=lambda m: m["created_at"])
        if detail == "summary":
            return [{"name": f"{session_id}/{m['file_id']}",
                     "lastModified": m["created_at"].isoformat(timespec="milliseconds").replace("+00:00", "Z")}
                    for m in found]
        return [{"id": m["file_id"], "name": m["filename"], "path": m["path"]} for m in found]

    @app.get("/download/{session_id}/{file_id}")
    async def download(session_id: str, file_id: str) -> StreamingResponse:
        meta = await metadata(session_id, file_id)
        if meta is None:
            raise HTTPException(status_code=404, detail="File not found")

        def fetch() -> bytes:
            response = minio.get_object(bucket, meta["object_key"])
            try:
                data: bytes = response.read()
                return data
            finally:
                response.close()
                response.release_conn()

        content = await asyncio.get_running_loop().run_in_executor(None, fetch)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(content), 8192):
                yield content[offset:offset + 8192]

        return StreamingResponse(chunks(), media_type=meta["content_type"], headers={
            "Content-Disposition": f'attachment; filename="{meta["filename"]}"',
            "Cache-Control": "private, max-age=3600"})

    @app.delete("/files/{session_id}/{file_id}")
    async def delete_file(session_id: str, file_id: str) -> Response:
        meta = await metadata(session_id, file_id)
        if meta is None:
            raise HTTPException(status_code=404, detail="File not found")
        await asyncio.get_running_loop().run_in_executor(None, minio.remove_object, bucket, meta["object_key"])
        await redis.delete(f"{prefix}files:{session_id}:{file_id}")
        await redis.srem(f"{prefix}session_files:{session_id}", file_id)
        return Response(status_code=200)

    app.add_middleware(_metrics_middleware())
    return SecurityMiddleware(RequestLoggingMiddleware(app), api_key, redis)


def _metrics_middleware() -> Any:
    from starlette.middleware.base import BaseHTTPMiddleware

    class Metrics(BaseHTTPMiddleware):
        """Per-request record into an in-memory ring, on ``BaseHTTPMiddleware`` as KubeCodeRun's."""

        records: ClassVar[deque[tuple[str, str, int, float]]] = deque(maxlen=10_000)

        async def dispatch(self, request: Any, call_next: Any) -> Any:
            started = time.perf_counter()
            response = await call_next(request)
            self.records.append((request.method, request.url.path, response.status_code,
                                 (time.perf_counter() - started) * 1000))
            return response

    return Metrics


class RequestLoggingMiddleware:
    """Plain ASGI: one structlog line per request (``/health`` excepted)."""

    def __init__(self, app: Any) -> None:
        import structlog

        structlog.configure(processors=[structlog.processors.add_log_level,
                                        structlog.processors.TimeStamper(fmt="iso"),
                                        structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            cache_logger_on_first_use=True)
        self.log = structlog.get_logger("peer")
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def remember(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, remember)
        finally:
            if scope["path"] != "/health":
                self.log.info("Request processed", method=scope["method"], path=scope["path"], status=status[0],
                              duration_ms=round((time.perf_counter() - started) * 1000, 2))


class SecurityMiddleware:
    """Plain ASGI: security headers on every answer; the API-key check (with its two Redis reads)
    on every route but ``/health``."""

    HEADERS: ClassVar[list[tuple[bytes, bytes]]] = [
        (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
        (b"x-xss-protection", b"1; mode=block"), (b"referrer-policy", b"strict-origin-when-cross-origin"),
        (b"content-security-policy", b"default-src 'self'")]

    def __init__(self, app: Any, key: str, redis: Any) -> None:
        self.app, self.key, self.redis = app, key.encode(), redis

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        if scope["path"] != "/health" and not await self.authorised(scope):
            body = b'{"error":"Invalid or missing API key"}'
            await send_with_headers({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_with_headers)

    async def authorised(self, scope: dict[str, Any]) -> bool:
        client = (scope.get("client") or ("unknown", 0))[0]
        failures = await self.redis.get(f"auth_failures:{client}")
        if failures is not None and int(failures) >= 10:
            return False
        given = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        managed = await self.redis.hgetall(f"api_keys:{hashlib.sha256(given).hexdigest()[:16]}")
        return bool(managed) or secrets.compare_digest(given, self.key)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="KubeCodeRun-shaped benchmark peer (FastAPI on uvicorn)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(), host=args.host, port=args.port, workers=1, loop="uvloop", http="httptools",
                access_log=True, log_level="info")


if __name__ == "__main__":
    main()
