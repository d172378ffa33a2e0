"""``SidecarSandbox``: the ``Sandbox`` protocol over HTTP, for our sidecar and KubeCodeRun's.

One instance per sandbox (a local sidecar process or a pod); the ``httpx.AsyncClient`` is shared per
executor. The same code drives our sidecar, KubeCodeRun's 2.1.3 Python sidecar and its 3.x Go runner
(``kubecoderun-internals.md`` §2), normalising their differences:

* Timeouts: our sidecar says ``timed_out``; the 2.1.3 sidecar answers exit 124, the Go runner exit -1
  with partial output. An exit of 124 or -1 once the timeout has elapsed counts as a timeout.
* Generated files: ours lists them in the execute response (``generated``); for the others we ask
  ``GET /files`` and drop the runner's source files and the inputs we uploaded, unless their size
  changed.
* Downloads: names are URL-encoded; redirects are never followed. The Go runner answers a file named
  ``index.html`` with a 301 (Go's ``http.ServeFile`` rule); we then ask once more with a trailing
  slash, which ``ServeFile`` serves without redirecting, and report a clear error if that fails too.

Cancellation: cancelling ``run()`` abandons the HTTP request, and httpcore closes that connection
(a half-read response is never returned to the pool). Closing is what tells the sidecar to kill the
program's whole process tree.

Failures: a sidecar that cannot be reached (connect errors, 5xx, garbage) raises
``errors.Unavailable``; a sidecar that dies *during* a run yields a ``RunResult`` with ``failure``.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from kcr_trio.core.errors import ApiError, NotFound, TooLarge, Unavailable
from kcr_trio.core.languages import SOURCE_FILES
from kcr_trio.core.model import GeneratedFile, RunResult
from kcr_trio.core.names import guess_content_type

from .sidecar_wire import SidecarWire

# What KubeCodeRun's runners leave in /mnt/data besides the source file.
RUNNER_FILES = SOURCE_FILES | {"Code.class"}
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
_BROKEN_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.WriteTimeout)


@runtime_checkable
class SidecarEndpoint(Protocol):
    """A sandbox served by a sidecar over HTTP. Programmatic tool calling talks to that sidecar
    directly (``backends/ptc_sidecar.py``: ``/ptc/start``, ``/ptc/results``); a sandbox without
    one (the in-process twin) has no PTC channel."""

    def sidecar_endpoint(self) -> tuple[str, httpx.AsyncClient] | None:
        """The sidecar's base URL and the client to reach it with, or ``None``."""


class SidecarSandbox:
    """A sandbox reached at ``base_url`` (``http://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient,
        timeout_cap: float | None = None,
        answer_margin: float = 15.0,
        file_timeout: float = 60.0,
        compile_timeout: float = 0.0,
        wire: SidecarWire | None = None,
    ) -> None:
        """``timeout_cap``: the sidecar's own maximum (120 for KubeCodeRun's 2.1.3 sidecar, which
        answers 422 above it); longer runs are clamped. ``answer_margin``: how long past the run's
        timeout we wait for the sidecar to answer before declaring it dead."""
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._timeout_cap = timeout_cap
        self._margin = answer_margin
        # Our sidecar gives compile steps their own budget (``--compile-timeout``) before the
        # program's timeout starts: the answer may come that much later.
        self._compile_timeout = compile_timeout
        # A local sidecar's kept-alive connection for ``/execute`` (``sidecar_wire``: the run's hop
        # off httpx); None: httpx, as for pods.
        self._wire = wire
        self._file_seconds = file_timeout
        self._inputs: dict[str, int] = {}
        self._generated: list[GeneratedFile] | None = None

    @property
    def _file_timeout(self) -> httpx.Timeout:
        """Built when a file moves, not per run (most runs move none)."""
        return httpx.Timeout(self._file_seconds, connect=5.0)

    def __repr__(self) -> str:
        return f"SidecarSandbox({self.base_url!r})"

    def sidecar_endpoint(self) -> tuple[str, httpx.AsyncClient]:
        """``SidecarEndpoint``: this sidecar, on this sandbox's client."""
        return self.base_url, self._client

    # --- files in -------------------------------------------------------------------------
    async def put_file(self, name: str, chunks: AsyncIterable[bytes]) -> None:
        boundary = "kcr" + secrets.token_hex(12)
        size = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal size
            safe = name.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{safe}\"\r\n"
                   f"Content-Type: application/octet-stream\r\n\r\n").encode()
            async for chunk in chunks:
                size += len(chunk)
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        try:
            resp = await self._client.post(
                f"{self.base_url}/files",
                content=body(),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=self._file_timeout,
            )
        except _CONNECT_ERRORS as exc:
            raise self._unreachable(exc) from exc
        except (*_BROKEN_ERRORS, httpx.ReadTimeout) as exc:
            raise Unavailable(f"Sandbox {self.base_url} failed while receiving {name!r}: {_why(exc)}") from exc
        if resp.status_code == 413:
            raise TooLarge(f"File {name!r} is larger than the sandbox accepts")
        self._check(resp, f"upload {name!r}")
        self._inputs[name] = size

    # --- run ------------------------------------------------------------------------------
    async def run(self, code: str, *, timeout: float, request_id: str, args: Sequence[str] = ()) -> RunResult:
        if self._timeout_cap is not None:
            timeout = min(timeout, self._timeout_cap)
        wire_timeout = max(1, math.ceil(timeout))  # KubeCodeRun's sidecar validates an int
        started = time.monotonic()
        try:
            answer_within = wire_timeout + self._compile_timeout + self._margin
            if self._wire is not None:
                answer = await self._wire.post("/execute", _execute_body(code, wire_timeout, request_id, args),
                                               headers=[("x-request-id", request_id)], timeout=answer_within)
                status, content = answer.status_code, answer.content
            else:
                body: dict[str, Any] = {"code": code, "timeout": wire_timeout, "request_id": request_id}
                if args:  # [args] sent only when given: KubeCodeRun's runners never see an unknown field
                    body["args"] = list(args)
                resp = await self._client.post(
                    f"{self.base_url}/execute",
                    json=body,
                    headers={"x-request-id": request_id},
                    timeout=httpx.Timeout(answer_within, connect=5.0),
                )
                self._check(resp, "execute")
                status, content = resp.status_code, resp.content
        except _CONNECT_ERRORS as exc:
            raise self._unreachable(exc) from exc
        except httpx.ReadTimeout:
            why = f"the sandbox did not answer within {wire_timeout + self._compile_timeout + self._margin:g} s"
            return RunResult(exit_code=124, stdout="", stderr=f"Execution timed out after {wire_timeout} seconds",
                             timed_out=True, duration_ms=(time.monotonic() - started) * 1000, failure=why)
        except _BROKEN_ERRORS as exc:
            why = f"The sandbox stopped responding during the run ({_why(exc)})"
            return RunResult(exit_code=-1, stdout="", stderr=why,
                             duration_ms=(time.monotonic() - started) * 1000, failure=why)
        elapsed = time.monotonic() - started
        if status != 200:
            self._check_status(status, content.decode("utf-8", "replace")[:300], "execute")
        data = self._decode(content)
        exit_code = _int(data.get("exit_code"), -1)
        timed_out = data.get("timed_out")
        if not isinstance(timed_out, bool):
            # 2.1.3 sidecar: 124; Go runner: -1 after the context deadline killed the process.
            timed_out = exit_code in (124, -1) and elapsed >= 0.95 * wire_timeout
        stderr = _text(data.get("stderr"))
        if timed_out and exit_code == -1:
            exit_code = 124
            if "timed out" not in stderr:
                stderr = (stderr + "\n" if stderr and not stderr.endswith("\n") else stderr) + \
                    f"Execution timed out after {wire_timeout} seconds"
        generated = data.get("generated")
        self._generated = (
            [GeneratedFile(str(g["name"]), _int(g.get("size"), 0), g.get("mime_type") or guess_content_type(str(g["name"])))
             for g in generated if isinstance(g, dict) and g.get("name")]
            if isinstance(generated, list) else None
        )
        duration = data.get("execution_time_ms")
        removed = data.get("removed")  # our sidecar only; KubeCodeRun's runners cannot tell
        return RunResult(
            exit_code=exit_code,
            stdout=_text(data.get("stdout")),
            stderr=stderr,
            timed_out=timed_out,
            duration_ms=float(duration) if isinstance(duration, (int, float)) else elapsed * 1000,
            generated=list(self._generated) if self._generated is not None else None,
            removed=[n for n in removed if isinstance(n, str)] if isinstance(removed, list) else None,
        )

    # --- files out ------------------------------------------------------------------------
    async def generated_files(self) -> list[GeneratedFile]:
        if self._generated is not None:
            return list(self._generated)
        try:
            resp = await self._client.get(f"{self.base_url}/files", timeout=self._file_timeout)
        except _CONNECT_ERRORS as exc:
            raise self._unreachable(exc) from exc
        except (*_BROKEN_ERRORS, httpx.ReadTimeout) as exc:
            raise Unavailable(f"Sandbox {self.base_url} failed while listing files: {_why(exc)}") from exc
        self._check(resp, "list files")
        entries = self._json(resp).get("files")
        out: list[GeneratedFile] = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            name, size = entry["name"], _int(entry.get("size"), 0)
            if "/" in name or name in RUNNER_FILES:
                continue
            if name in self._inputs and self._inputs[name] == size:
                continue  # an input we uploaded, apparently untouched
            out.append(GeneratedFile(name, size, entry.get("mime_type") or guess_content_type(name)))
        return out

    @asynccontextmanager
    async def open_file(self, name: str) -> AsyncIterator[AsyncIterator[bytes]]:
        url = f"{self.base_url}/files/{quote(name, safe='')}"
        for attempt in (url, url + "/"):
            try:
                async with self._client.stream("GET", attempt, timeout=self._file_timeout) as resp:
                    if resp.status_code in (301, 302, 303, 307, 308):
                        continue  # Go's ServeFile redirects ".../index.html"; try the slash form
                    if resp.status_code == 404:
                        raise NotFound(f"File {name!r} not found in the sandbox")
                    if resp.status_code != 200:
                        await resp.aread()
                        self._check(resp, f"download {name!r}")
                    yield self._body(resp, name)
                    return
            except _CONNECT_ERRORS as exc:
                raise self._unreachable(exc) from exc
        raise Unavailable(f"The sandbox redirects every download of {name!r}; the file cannot be read "
                          "(KubeCodeRun's Go runner does this for files named index.html)")

    async def _body(self, resp: httpx.Response, name: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_bytes():
                yield chunk
        except (*_BROKEN_ERRORS, httpx.ReadTimeout) as exc:
            raise Unavailable(f"Sandbox {self.base_url} failed while sending {name!r}: {_why(exc)}") from exc

    # --- helpers --------------------------------------------------------------------------
    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"Sandbox {self.base_url} is unreachable: {_why(exc)}")

    def _check(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code == 200:
            return
        detail = resp.text[:300] if not resp.is_stream_consumed or resp.is_closed else ""
        self._check_status(resp.status_code, detail, what)

    def _check_status(self, status: int, detail: str, what: str) -> None:
        if status == 200:
            return
        if status >= 500 or status == 409:
            raise Unavailable(f"Sandbox {self.base_url} could not {what}: HTTP {status} {detail}".strip())
        raise ApiError(f"Sandbox {self.base_url} refused to {what}: HTTP {status} {detail}".strip(), status=502)

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        return self._decode(resp.content)

    def _decode(self, content: bytes) -> dict[str, Any]:
        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Unavailable(f"Sandbox {self.base_url} answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise Unavailable(f"Sandbox {self.base_url} answered with unexpected JSON")
        return data


def _execute_body(code: str, timeout: int, request_id: str, args: Sequence[str]) -> bytes:
    """``json.dumps`` of the ``/execute`` body, byte for byte, without building an encoder per call
    (``json.dumps`` makes a new C encoder each time; this is one C call per string)."""
    text = f'{{"code": {_json_str(code)}, "timeout": {timeout:d}, "request_id": {_json_str(request_id)}'
    if args:  # [args] sent only when given: KubeCodeRun's runners never see an unknown field
        text += ', "args": [' + ", ".join(map(_json_str, args)) + "]"
    return (text + "}").encode()


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
