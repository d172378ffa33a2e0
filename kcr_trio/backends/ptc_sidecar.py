"""The API server's side of the sidecar's live PTC channel (``sidecar/ptc.py``).

``open_ptc_run(sandbox, body)`` opens ``POST /ptc/start`` as a stream and yields a ``PtcRun``:
``events()`` gives the sidecar's JSON lines (batches of calls, then ``done``), ``answer()`` posts
results on a second connection. Leaving the block closes the stream, which kills the run in the
sidecar (the same rule as a disconnected ``/execute``).

Works for every sandbox that is (or wraps, like the Kubernetes executor's ``PodSandbox``) a
``SidecarSandbox`` of our own sidecar; KubeCodeRun's runners have no such route and are refused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from kcr_trio.core.errors import ApiError, Unavailable
from kcr_trio.core.model import GeneratedFile, RunResult
from kcr_trio.core.names import guess_content_type

from .sidecar_client import SidecarEndpoint


def _endpoint(sandbox: Any) -> tuple[str, httpx.AsyncClient]:
    endpoint = sandbox.sidecar_endpoint() if isinstance(sandbox, SidecarEndpoint) else None
    if endpoint is None:
        # A capability error (contract §1.0.1): the client tells the model not to retry here.
        raise ApiError("unsupported_capability", status=409, shape="A")
    return endpoint


class PtcRun:
    def __init__(self, resp: httpx.Response, client: httpx.AsyncClient, base_url: str, run_id: str) -> None:
        self._resp = resp
        self._client = client
        self._base_url = base_url
        self._run_id = run_id

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in self._resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable(f"The sandbox stopped responding during the run ({exc or type(exc).__name__})") from exc

    async def answer(self, results: dict[str, dict[str, Any]]) -> None:
        try:
            resp = await self._client.post(f"{self._base_url}/ptc/results", json={"run": self._run_id, "results": results},
                                           timeout=httpx.Timeout(30.0, connect=5.0))
        except httpx.HTTPError as exc:
            raise Unavailable(f"The sandbox did not take the tool results ({exc or type(exc).__name__})") from exc
        if resp.status_code != 200:
            raise Unavailable(f"The sandbox refused the tool results: HTTP {resp.status_code} {resp.text[:200]}")


@asynccontextmanager
async def open_ptc_run(sandbox: Any, body: dict[str, Any]) -> AsyncIterator[PtcRun]:
    base_url, client = _endpoint(sandbox)
    try:
        async with client.stream("POST", f"{base_url}/ptc/start", json=body,
                                 timeout=httpx.Timeout(None, connect=5.0)) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:300].decode("utf-8", "replace")
                raise Unavailable(f"The sandbox could not start the PTC run: HTTP {resp.status_code} {detail}")
            yield PtcRun(resp, client, base_url, str(body["request_id"]))
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError) as exc:
        raise Unavailable(f"Sandbox {base_url} is unreachable: {exc or type(exc).__name__}") from exc


def run_result(data: dict[str, Any]) -> RunResult:
    """The sidecar's ``/execute``-shaped answer as a ``RunResult``."""
    generated = data.get("generated")
    files = None
    if isinstance(generated, list):
        files = [GeneratedFile(str(g["name"]), int(g.get("size") or 0), g.get("mime_type") or guess_content_type(str(g["name"])))
                 for g in generated if isinstance(g, dict) and g.get("name")]
    exit_code = data.get("exit_code")
    return RunResult(
        exit_code=exit_code if isinstance(exit_code, int) else -1,
        stdout=str(data.get("stdout") or ""),
        stderr=str(data.get("stderr") or ""),
        timed_out=bool(data.get("timed_out")),
        failure=data.get("failure") if isinstance(data.get("failure"), str) else None,
        generated=files,
    )
