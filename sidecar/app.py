"""The sidecar's HTTP surface: a plain ASGI app (no framework) served by ``httpd.py``.

Routes are KubeCodeRun's pod protocol (``POST /execute``, ``POST|GET /files``,
``GET|DELETE /files/{name}``, ``GET /health``, ``GET /ready``); our additions are extra JSON fields
that older clients ignore.

Cancellation: while ``/execute`` runs, a watcher task keeps calling ``receive()``; the server delivers
``http.disconnect`` as soon as the caller's connection closes, and the watcher cancels the run, whose
``finally`` kills the whole process tree (see ``runner.py``). Nothing is sent after a disconnect.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from . import files, ptc
from .config import Config
from .multipart import MultipartError, Parser, boundary_of
from .runner import Conflict, Runner, log

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Disconnected(Exception):
    """The caller went away before we could answer: nothing left to send."""


class HTTPError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def _validation(field: str, msg: str, kind: str = "value_error") -> HTTPError:
    return HTTPError(422, [{"type": kind, "loc": ["body", field], "msg": msg}])


# ``json.dumps(..., ensure_ascii=False)`` builds a new encoder on every call; one shared encoder
# gives the same text (same options) for less Python per answer.
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


async def send_json(send: Send, status: int, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = _ENCODE(body).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": data})


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise Disconnected
        chunks += msg.get("body", b"")
        if len(chunks) > limit:
            raise HTTPError(413, f"Request body larger than {limit} bytes")
        if not msg.get("more_body"):
            return bytes(chunks)


class App:
    def __init__(self, cfg: Config, runner: Runner) -> None:
        self.cfg = cfg
        self.runner = runner

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self.route(scope, receive, send)
        except HTTPError as exc:
            await send_json(send, exc.status, {"detail": exc.detail})
        except Disconnected:
            return

    async def route(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/health" and method == "GET":
            return await send_json(send, 200, {
                "status": "healthy", "language": self.runner.spec.code,
                "working_dir": self.cfg.working_dir,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "busy": self.runner.busy, "prewarm": self.runner.prewarm_enabled,
            })
        if path == "/ready" and method == "GET":
            if self.runner.ready:
                return await send_json(send, 200, {"status": "ready"})
            return await send_json(send, 503, {"status": "not ready"})
        await self.runner.settle()  # the last run's interpreter is gone before anything else
        if path == "/reset":
            if method != "POST":
                raise HTTPError(405, "Method Not Allowed")
            try:
                await self.runner.reset()
            except Conflict as exc:
                raise HTTPError(409, str(exc)) from None
            return await send_json(send, 200, {"status": "reset", "runs": self.runner.runs})
        if path == "/execute":
            if method != "POST":
                raise HTTPError(405, "Method Not Allowed")
            return await self.execute(scope, receive, send)
        if path in ("/files", "/files/"):
            if method == "GET":
                entries = files.listing(self.cfg.working_dir)
                return await send_json(send, 200, {"files": [e.as_json() for e in entries]})
            if method == "POST":
                return await self.upload(scope, receive, send)
            raise HTTPError(405, "Method Not Allowed")
        if path.startswith("/files/"):
            name = path[len("/files/"):]
            if method == "GET":
                return await self.download(name, send)
            if method == "DELETE":
                if not files.delete(self.cfg.working_dir, name):
                    raise HTTPError(404, "File not found")
                return await send_json(send, 200, {"deleted": name})
            raise HTTPError(405, "Method Not Allowed")
        if path.startswith("/ptc/") and method == "POST":  # programmatic tool calling (ptc.py)
            return await ptc.route(self, path, receive, send)
        raise HTTPError(404, "Not Found")

    # --- /execute ---------------------------------------------------------------------------
    def _parse_execute(self, body: bytes) -> tuple[str, float, str | None, list[str]]:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _validation("body", "Request body is not valid JSON", "json_invalid") from None
        if not isinstance(req, dict):
            raise _validation("body", "Request body must be a JSON object", "dict_type")
        code = req.get("code")
        if not isinstance(code, str):
            raise _validation("code", "Field required (a string)", "missing")
        timeout = req.get("timeout", min(self.cfg.default_timeout, self.cfg.max_execution_time))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise _validation("timeout", "timeout must be a number", "float_type")
        if timeout <= 0 or timeout > self.cfg.max_execution_time:
            raise _validation("timeout", f"timeout must be > 0 and <= {self.cfg.max_execution_time:g}",
                              "less_than_equal")
        wd = req.get("working_dir")
        if wd is not None and wd not in (self.cfg.working_dir, "/mnt/data"):
            raise _validation("working_dir", f"working_dir must be {self.cfg.working_dir}")
        rid = req.get("request_id")
        # [args] the program's argv (contract §4.3); the API validated them, this guards the pod.
        args = req.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
            raise _validation("args", "args must be a list of strings without NUL characters", "list_type")
        return code, float(timeout), (rid if isinstance(rid, str) and rid else None), args

    async def execute(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_body(receive, self.cfg.max_body_mb * 1024 * 1024)
        code, timeout, rid, args = self._parse_execute(body)
        request_id = rid or _header(scope, b"x-request-id") or secrets.token_hex(8)
        if self.runner.busy:
            raise HTTPError(409, "An execution is already running in this sidecar")
        try:
            await self._execute(code, timeout, request_id, receive, send, args)
        finally:
            self.runner.replenish()

    async def _execute(self, code: str, timeout: float, request_id: str, receive: Receive,
                       send: Send, args: list[str] | None = None) -> None:
        disconnected = False
        error: HTTPError | None = None  # raised after the nursery (inside, it would be grouped)
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal disconnected
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        disconnected = True
                        log("client_disconnected", request_id=request_id)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                result = await self.runner.execute(code, timeout, request_id, args=args)
            except Conflict as exc:
                error = HTTPError(409, str(exc))
            except OSError as exc:  # cannot write the source file, fork, ... : the sandbox is broken
                log("execution_setup_failed", request_id=request_id, error=str(exc))
                error = HTTPError(503, f"Cannot start the program: {exc.strerror or exc}")
            else:
                # Answer while the watcher still listens (reading and writing a connection are
                # independent), and only then stop it: its teardown is not on the caller's clock.
                if not disconnected:
                    await send_json(send, 200, result,
                                    [(b"x-request-id", request_id.encode("latin-1", "replace"))])
            nursery.cancel_scope.cancel()
        if error is not None and not disconnected:
            raise error

    # --- files ------------------------------------------------------------------------------
    async def upload(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        boundary = boundary_of(_header(scope, b"content-type") or "")
        if boundary is None:
            raise HTTPError(400, "Expected multipart/form-data with a boundary")
        limit = self.cfg.max_file_size_mb * 1024 * 1024
        wd = self.cfg.working_dir
        parser = Parser(boundary)
        uploaded: list[dict[str, Any]] = []
        skipped: list[str] = []
        current: dict[str, Any] | None = None  # {"name", "tmp", "fd", "size"}
        dfd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            done = False
            while not done:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                try:
                    events = parser.feed(msg.get("body", b""))
                except MultipartError as exc:
                    raise HTTPError(400, str(exc)) from None
                for kind, value in events:
                    if kind == "part":
                        name = files.upload_name(value.filename)  # type: ignore[attr-defined]
                        if name is None:
                            if value.filename:  # type: ignore[attr-defined]
                                skipped.append(value.filename)  # type: ignore[attr-defined]
                            current = None
                            continue
                        tmp = f".upload-{secrets.token_hex(6)}"
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                                     dir_fd=dfd)
                        current = {"name": name, "tmp": tmp, "fd": fd, "size": 0}
                    elif kind == "data" and current is not None:
                        current["size"] += len(value)  # type: ignore[arg-type]
                        if current["size"] > limit:
                            raise HTTPError(413, f"File {current['name']!r} is larger than "
                                                 f"{self.cfg.max_file_size_mb} MB")
                        view = memoryview(value)  # type: ignore[arg-type]
                        while view:
                            view = view[os.write(current["fd"], view):]
                    elif kind == "end" and current is not None:
                        self._finish_upload(dfd, current)
                        uploaded.append({"name": current["name"], "path": current["name"],
                                         "size": current["size"],
                                         "mime_type": files.mime_type(current["name"])})
                        current = None
                    elif kind == "done":
                        done = True
                if not msg.get("more_body"):
                    break
            if not done:
                raise HTTPError(400, "Incomplete multipart body")
        finally:
            if current is not None:
                os.close(current["fd"])
                try:
                    os.unlink(current["tmp"], dir_fd=dfd)
                except OSError:
                    pass
            os.close(dfd)
        body: dict[str, Any] = {"uploaded": uploaded}
        if skipped:
            body["skipped"] = skipped
        await send_json(send, 200, body)

    def _finish_upload(self, dfd: int, current: dict[str, Any]) -> None:
        fd = current.pop("fd")
        try:
            ident = self.runner.identity
            if ident.switching:
                os.fchown(fd, ident.uid, ident.gid)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        try:
            os.rename(current["tmp"], current["name"], src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            os.unlink(current["tmp"], dir_fd=dfd)
            raise HTTPError(400, f"Cannot store {current['name']!r}: {exc.strerror}") from None

    async def download(self, name: str, send: Send) -> None:
        opened = files.open_regular(self.cfg.working_dir, name)  # scope["path"] is already decoded
        if opened is None:
            raise HTTPError(404, "File not found")
        fd, size = opened
        try:
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", files.mime_type(name).encode()),
                            (b"content-length", str(size).encode())],
            })
            remaining = size
            while remaining > 0:
                chunk = await trio.to_thread.run_sync(os.read, fd, min(remaining, 256 * 1024))
                if not chunk:
                    break  # the file shrank: the client sees a short body, never garbage
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
            if remaining > 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif size == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            os.close(fd)


def _header(scope: dict[str, Any], key: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == key:
            value: str = v.decode("latin-1")
            return value
    return None
