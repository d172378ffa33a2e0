"""Driving KubeCodeRun's Go runner (``KCR_POD_PROTOCOL=kcr-runner``): what differs from our sidecar.

The runner speaks the same HTTP protocol as our sidecar (``SidecarSandbox`` handles both), but a few
of its behaviours would otherwise reach the user wrongly (``kubecoderun-internals.md`` §2.2):

* **Directories are listed as files.** ``GET /files`` lists a subdirectory as ``{"name": "sub",
  "size": 0}`` and ``GET /files/sub`` answers a JSON listing, which would be stored as an output file
  named ``sub``. A size-0 entry is therefore fetched once: a file is served by Go's
  ``http.ServeFile``, which always sets ``Accept-Ranges: bytes``, and an empty file has an empty body;
  the runner's own directory answer is a JSON object ``{"files": [...]}`` without that header. Only
  an entry with both signs of a directory is dropped. Files inside directories are not returned,
  as with our own sidecar, which reports top-level files only.
* **A silent time cap.** The runner clamps any ``timeout`` above its image's
  ``MAX_EXECUTION_TIME`` (120 s) without saying so, and then answers ``-1``; we send the capped value
  (``timeout_cap``) so a run that reaches it is reported as a timeout, and when the user's limit was
  above the cap, ``stderr`` says so.

Quirks that cannot be fixed from our side are documented in the chart README ("Runner quirks").
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from kcr_trio.core.errors import Unavailable
from kcr_trio.core.model import GeneratedFile, RunResult

from .sidecar_client import SidecarSandbox

RUNNER_DEFAULT_CAP = 120.0  # MAX_EXECUTION_TIME baked into KubeCodeRun's images
_LISTING_PROBE_BYTES = 1 << 20  # a directory listing larger than this is not read to the end


class RunnerSandbox(SidecarSandbox):
    """A ``SidecarSandbox`` for a KubeCodeRun runner pod."""

    def __init__(self, base_url: str, *, client: httpx.AsyncClient, runner_cap: float = RUNNER_DEFAULT_CAP,
                 **kw: Any) -> None:
        super().__init__(base_url, client=client, timeout_cap=runner_cap, **kw)
        self.runner_cap = runner_cap

    async def run(self, code: str, *, timeout: float, request_id: str) -> RunResult:
        result = await super().run(code, timeout=timeout, request_id=request_id)
        if timeout > self.runner_cap and result.timed_out and result.failure is None:
            note = (f"Note: the execution image stops programs after {self.runner_cap:g} s "
                    f"(its MAX_EXECUTION_TIME), below the configured limit of {timeout:g} s.")
            result.stderr = append_line(result.stderr, note)
        return result

    async def generated_files(self) -> list[GeneratedFile]:
        listed = await super().generated_files()
        return [g for g in listed if g.size != 0 or not await self._is_directory(g.name)]

    async def _is_directory(self, name: str) -> bool:
        """True when the runner answers ``GET /files/<name>`` the way it answers for a directory."""
        url = f"{self.base_url}/files/{_quote(name)}"
        try:
            async with self._client.stream("GET", url, timeout=self._file_timeout) as resp:
                if resp.status_code != 200 or "accept-ranges" in resp.headers:
                    return False
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _LISTING_PROBE_BYTES:
                        return False
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise Unavailable(f"Sandbox {self.base_url} failed while inspecting {name!r}: {exc}") from exc
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and isinstance(data.get("files"), list)


def append_line(text: str, line: str) -> str:
    """``text`` with ``line`` appended on a line of its own."""
    return text + ("\n" if text and not text.endswith("\n") else "") + line


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
