"""HTTP helpers shared by the scenarios: clients, hello-world programs, a timed ``/exec``.

Latency is measured until the whole body has been read and parsed — not at the response headers as
KubeCodeRun's own scripts do: with a heartbeating server the headers arrive after the grace, long
before the result, and timing them would flatter it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from kcr_trio.bench.targets import Target

HELLO: dict[str, str] = {
    "py": "print('hi')",
    "js": "console.log('hi')",
    "ts": "const s: string = 'hi'; console.log(s)",
    "go": 'package main\nimport "fmt"\nfunc main() { fmt.Println("hi") }\n',
    "java": 'public class Code { public static void main(String[] a) { System.out.println("hi"); } }\n',
    "c": '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "hi" << std::endl; return 0; }\n',
    "php": '<?php echo "hi\\n";',
    "rs": 'fn main() { println!("hi"); }\n',
    "r": 'cat("hi\\n")',
    "f90": "program hi\n  print '(a)', 'hi'\nend program hi\n",
    "d": 'import std.stdio;\nvoid main() { writeln("hi"); }\n',
    "bash": "echo hi",
}


def client(target: Target, *, timeout: float, connections: int = 10) -> httpx.AsyncClient:
    """A client for one target; keep-alive pooled, TLS verification on (operators' URLs)."""
    return httpx.AsyncClient(
        base_url=target.url,
        headers={**target.headers, "User-Agent": "kcr-trio-bench"},
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


class ExecOutcome:
    __slots__ = ("body", "error", "ms", "ok", "status")

    def __init__(self, ok: bool, status: int | None, ms: float, body: dict[str, Any] | None, error: str | None) -> None:
        self.ok, self.status, self.ms, self.body, self.error = ok, status, ms, body, error


async def timed_exec(c: httpx.AsyncClient, body: dict[str, Any], expect_stdout: str | None = None) -> ExecOutcome:
    """POST /exec, read the whole body; ``ok`` means 200, parseable JSON and the expected stdout."""
    start = time.perf_counter()
    try:
        r = await c.post("/exec", json=body)
        raw = r.content
    except httpx.HTTPError as exc:
        return ExecOutcome(False, None, (time.perf_counter() - start) * 1000, None, f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - start) * 1000
    try:
        parsed = json.loads(raw)
    except ValueError:
        return ExecOutcome(False, r.status_code, ms, None, f"HTTP {r.status_code}: unparseable body {raw[:120]!r}")
    if r.status_code != 200:
        return ExecOutcome(False, r.status_code, ms, parsed if isinstance(parsed, dict) else None,
                           f"HTTP {r.status_code}: {str(parsed)[:160]}")
    if expect_stdout is not None and str(parsed.get("stdout", "")).strip() != expect_stdout.strip():
        return ExecOutcome(False, 200, ms, parsed,
                           f"unexpected stdout {str(parsed.get('stdout'))[:80]!r} stderr {str(parsed.get('stderr'))[:160]!r}")
    return ExecOutcome(True, 200, ms, parsed, None)


async def upload(c: httpx.AsyncClient, name: str, data: bytes, entity_id: str | None = "kcr-bench") -> httpx.Response:
    form = {"entity_id": entity_id} if entity_id else {}
    return await c.post("/upload", files={"file": (name, data, "application/octet-stream")}, data=form)


def uploaded_ref(response: httpx.Response) -> tuple[str, str, str]:
    """(session_id, file_id, filename) from a successful upload answer."""
    body = response.json()
    f = body["files"][0]
    return body["session_id"], f["fileId"], f["filename"]
