"""A test double of KubeCodeRun's Go runner (3.x language images), speaking its wire protocol.

The Kubernetes emulator runs this for ``kcr-runner`` pods, so the executor meets the runner's real
behaviour instead of kcr-trio's own sidecar. Written from the pod protocol in
``kubecoderun-internals.md`` §2.2 and from what the real runner was observed to do; every quirk
below is deliberate, because the executor must cope with each one:

* ``POST /execute`` ``{"code", "timeout", "working_dir"}``: the code goes to the language's file in
  the working directory and runs with the runner's own environment. ``timeout <= 0`` or above
  ``MAX_EXECUTION_TIME`` (image default 120) is **clamped silently**. On the deadline only the
  direct child is killed (Go's ``exec.CommandContext``), and the answer is ``exit_code -1`` with the
  partial output — not 124. A child killed by any signal (an OOM kill included) is also ``-1``.
* ``stderr`` is returned **only when the exit code is non-zero** (Go's ``cmd.Output()``), keeping
  its first and last 32 KiB; a successful program's warnings are lost.
* ``stdout`` is cut at ``MAX_OUTPUT_SIZE`` bytes (1 MiB) **with no flag**, and invalid UTF-8 left by
  the cut becomes U+FFFD (Go's JSON encoder).
* A missing interpreter or compiler is ``exit_code 1`` with ``Execution error: ...``.
* ``GET /files`` lists the top level of the working directory, **directories as size-0 entries**;
  ``GET /files/{path}`` answers a directory with a JSON listing (``{"files": [...]}``, paths relative
  to the working directory) and a file like Go's ``http.ServeFile``: ``Accept-Ranges: bytes``,
  ``Last-Modified``, and a **301 to ``./``** for any path ending in ``/index.html``.
* ``POST /files`` takes any multipart field name, keeps the basename, skips dot-files; listings
  carry no ``mime_type``.
* ``GET /ready`` only checks that the working directory exists; ``GET /health`` answers always.
* The HTTP client hanging up does **not** stop a run (the runner uses a background context).

Configuration is the runner's: environment ``LANGUAGE`` (baked into the image), ``WORKING_DIR``,
``MAX_EXECUTION_TIME``, ``MAX_OUTPUT_SIZE``, ``RUNNER_PORT``; ``--host``/``--port``/``--working-dir``
override them for the emulator (each pod listens on its own loopback address). Standard library
only, so a pod starts in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.parser
import email.policy
import http.server
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

STDERR_KEEP = 32 * 1024  # Go's prefixSuffixSaver keeps this much at each end of stderr

# language -> (file name, argv with {file}/{wd}); "sh -c" chains for the compiled languages.
LANGUAGES: dict[str, tuple[str, list[str]]] = {
    "py": ("code.py", ["python", "{file}"]),
    "js": ("code.js", ["node", "{file}"]),
    "ts": ("code.ts", ["node", "/opt/scripts/ts-runner.js", "{file}"]),
    "go": ("main.go", ["go", "run", "{file}"]),
    "php": ("code.php", ["php", "{file}"]),
    "r": ("code.r", ["Rscript", "{file}"]),
    "java": ("Code.java", ["sh", "-c", "javac {file} && java -cp {wd} Code"]),
    "c": ("code.c", ["sh", "-c", "gcc {file} -o /tmp/code && /tmp/code"]),
    "cpp": ("code.cpp", ["sh", "-c", "g++ {file} -o /tmp/code && /tmp/code"]),
    "rs": ("main.rs", ["sh", "-c", "rustc {file} -o /tmp/main && /tmp/main"]),
    "f90": ("code.f90", ["sh", "-c", "gfortran {file} -o /tmp/code && /tmp/code"]),
    "d": ("code.d", ["sh", "-c", "ldc2 {file} -of=/tmp/code && /tmp/code"]),
}
ALIASES = {"python": "py", "javascript": "js", "typescript": "ts", "rust": "rs", "fortran": "f90", "dlang": "d"}

# Which LANGUAGE each KubeCodeRun image bakes in (the TypeScript image is built from the Node one,
# C++ uses the C image): ``kubecoderun-internals.md`` §2.2.
IMAGE_LANGUAGE = {
    "python": "py", "javascript": "js", "typescript": "js", "go": "go", "java": "java",
    "c-cpp": "c", "php": "php", "rust": "rs", "r": "r", "fortran": "f90", "d": "d",
}


def baked_language(image: str) -> str | None:
    """The ``LANGUAGE`` a KubeCodeRun image named ``<registry>-<suffix>:<tag>`` was built with."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    for suffix in sorted(IMAGE_LANGUAGE, key=len, reverse=True):
        if name == suffix or name.endswith("-" + suffix):
            return IMAGE_LANGUAGE[suffix]
    return None


class Config:
    def __init__(self, args: argparse.Namespace) -> None:
        self.language = ALIASES.get(os.environ.get("LANGUAGE") or "python", os.environ.get("LANGUAGE") or "python")
        self.working_dir = args.working_dir or os.environ.get("WORKING_DIR") or "/mnt/data"
        self.max_execution_time = _atoi(os.environ.get("MAX_EXECUTION_TIME"), 120)
        self.max_output_size = _atoi(os.environ.get("MAX_OUTPUT_SIZE"), 1048576)
        self.host = args.host
        self.port = args.port or _atoi(os.environ.get("RUNNER_PORT"), 8080)


def _atoi(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return 0  # Go's strconv.Atoi error leaves 0


# --------------------------------------------------------------------------------------------
# execution


def _cut_stderr(data: bytes) -> bytes:
    if len(data) <= 2 * STDERR_KEEP:
        return data
    omitted = len(data) - 2 * STDERR_KEEP
    return data[:STDERR_KEEP] + b"\n... omitting %d bytes ...\n" % omitted + data[-STDERR_KEEP:]


def _text(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", "replace")


def execute(cfg: Config, req: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()

    def ms() -> int:
        return int((time.monotonic() - started) * 1000)

    timeout = req.get("timeout")
    if not isinstance(timeout, int) or timeout <= 0 or timeout > cfg.max_execution_time:
        timeout = cfg.max_execution_time
    wd = req.get("working_dir") or cfg.working_dir
    spec = LANGUAGES.get(cfg.language)
    if spec is None:
        return {"exit_code": 1, "stdout": "", "stderr": f"Unsupported language: {cfg.language}",
                "execution_time_ms": ms()}
    filename, template = spec
    path = os.path.join(wd, filename)
    try:
        Path(path).write_text(str(req.get("code") or ""))
    except OSError as exc:
        return {"exit_code": 1, "stdout": "", "stderr": f"Failed to write code file: {exc}", "execution_time_ms": ms()}
    argv = [a.replace("{file}", path).replace("{wd}", wd) for a in template]
    if argv[0] == "python":
        argv[0] = sys.executable  # the image's python
    elif shutil.which(argv[0]) is None:
        return {"exit_code": 1, "stdout": "",
                "stderr": f'Execution error: exec: "{argv[0]}": executable file not found in $PATH',
                "execution_time_ms": ms()}
    proc = subprocess.Popen(argv, cwd=wd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the direct child, as exec.CommandContext does
        out, err = proc.communicate()
    code = proc.returncode if proc.returncode >= 0 else -1  # Go: ExitCode() is -1 after a signal
    return {
        "exit_code": code,
        "stdout": _text(out, cfg.max_output_size),
        "stderr": _text(_cut_stderr(err), cfg.max_output_size) if code != 0 else "",
        "execution_time_ms": ms(),
    }


# --------------------------------------------------------------------------------------------
# HTTP


def _http_date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    cfg: Config

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, value: Any) -> None:
        self._send(code, json.dumps(value).encode() + b"\n", {"Content-Type": "application/json"})

    def _error(self, code: int, text: str) -> None:  # Go's http.Error
        self._send(code, text.encode() + b"\n",
                   {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"})

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _resolve(self, rel: str) -> Path | None:
        root = Path(self.cfg.working_dir).resolve()
        target = Path(os.path.abspath(os.path.join(root, rel)))
        try:
            inside = os.path.relpath(target, root)
        except ValueError:
            return None
        return None if inside == ".." or inside.startswith("../") else target

    def _entries(self, directory: Path) -> list[dict[str, Any]]:
        root = Path(self.cfg.working_dir).resolve()
        out = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            is_dir = entry.is_dir()
            rel = os.path.relpath(os.path.join(directory, entry.name), root)
            out.append({"name": entry.name, "path": rel, "size": 0 if is_dir else st.st_size})
        return out

    # -- routes

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            self._json(200, {"status": "healthy", "language": self.cfg.language, "working_dir": self.cfg.working_dir,
                             "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})
        elif path == "/ready":
            if os.path.isdir(self.cfg.working_dir):
                self._json(200, {"status": "ready"})
            else:
                self._error(503, '{"detail":"Working directory not ready"}')
        elif path == "/files":
            try:
                files = [dict(e, path=e["name"]) for e in self._entries(Path(self.cfg.working_dir))]
            except OSError:
                self._error(404, '{"detail":"Working directory not found"}')
                return
            self._json(200, {"files": files})
        elif path.startswith("/files/"):
            self._download(urllib.parse.unquote(path[len("/files/"):]), path)
        else:
            self._error(404, "404 page not found")

    def _download(self, rel: str, url_path: str) -> None:
        target = self._resolve(rel)
        if target is None:
            self._error(403, '{"detail":"Access denied"}')
            return
        try:
            st = target.stat()
        except OSError:
            self._error(404, '{"detail":"File not found"}')
            return
        if target.is_dir():
            self._json(200, {"files": self._entries(target)})
            return
        if url_path.endswith("/index.html"):  # http.ServeFile's canonical-path rule
            self._send(301, b"", {"Location": "./"})
            return
        data = target.read_bytes()
        ctype = mimetypes.guess_type(target.name)[0] or (
            "text/plain; charset=utf-8" if _looks_textual(data) else "application/octet-stream")
        self._send(200, data, {"Accept-Ranges": "bytes", "Content-Type": ctype,
                               "Last-Modified": _http_date(st.st_mtime)})

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._read_body()
        if path == "/execute":
            try:
                req = json.loads(body)
            except ValueError:
                req = None
            if not isinstance(req, dict):
                self._json(400, {"detail": "Invalid request body"})
                return
            self._json(200, execute(self.cfg, req))
        elif path == "/files":
            self._upload(body)
        else:
            self._error(405, "Method Not Allowed")

    def _upload(self, body: bytes) -> None:
        ctype = self.headers.get("Content-Type") or ""
        if not ctype.startswith("multipart/form-data"):
            self._json(400, {"detail": "Invalid multipart form"})
            return
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        uploaded: list[dict[str, Any]] | None = None
        for part in message.iter_parts() if message.is_multipart() else ():
            filename = part.get_filename()
            if not filename:
                continue
            safe = os.path.basename(filename)
            if not safe or safe.startswith("."):
                continue
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            dest = os.path.join(self.cfg.working_dir, safe)
            try:
                Path(dest).write_bytes(data)
            except OSError:
                continue
            uploaded = (uploaded or []) + [{"name": safe, "path": dest, "size": len(data)}]
        self._json(200, {"uploaded": uploaded})  # Go's nil slice: null when nothing was stored

    def do_DELETE(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        self._read_body()
        if not path.startswith("/files/"):
            self._error(405, "Method Not Allowed")
            return
        rel = urllib.parse.unquote(path[len("/files/"):])
        target = self._resolve(rel)
        if target is None or target == Path(self.cfg.working_dir).resolve():
            self._error(403, '{"detail":"Access denied"}' if target is None else '{"detail":"Cannot delete working directory"}')
            return
        if not target.exists():
            self._error(404, '{"detail":"File not found"}')
            return
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        self._json(200, {"deleted": rel})


def _looks_textual(data: bytes) -> bool:
    head = data[:512]
    return b"\x00" not in head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--working-dir", default="")
    cfg = Config(parser.parse_args(argv))
    os.makedirs(cfg.working_dir, exist_ok=True)

    class Bound(Handler):
        pass

    Bound.cfg = cfg
    server = http.server.ThreadingHTTPServer((cfg.host, cfg.port), Bound)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
