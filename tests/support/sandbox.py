"""Helpers for the bubblewrap sandbox tests: sandboxed sidecars, runs, and /proc look-ups."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from tests.support.sidecar import Sidecar, running_sidecar

# KCR_TEST_SIDECAR_SANDBOX=none runs the same tests without the sandbox: they must then fail,
# which shows that each one depends on the isolation it claims to test.
SANDBOX_ARGS = ("--sandbox", os.environ.get("KCR_TEST_SIDECAR_SANDBOX", "bwrap"))


@asynccontextmanager
async def sandboxed(language: str = "py", *args: str, root: str | None = None
                    ) -> AsyncIterator[tuple[Sidecar, httpx.AsyncClient]]:
    """A real sidecar with ``--sandbox bwrap`` and an HTTP client for it."""
    async with running_sidecar(language, *SANDBOX_ARGS, *args, root=root) as sc:
        async with httpx.AsyncClient(base_url=sc.url, timeout=120) as client:
            yield sc, client


async def run(client: httpx.AsyncClient, code: str, timeout: float = 30.0) -> dict:
    resp = await client.post("/execute", json={"code": code, "timeout": timeout})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def upload(client: httpx.AsyncClient, name: str, data: bytes) -> None:
    resp = await client.post("/files", files=[("files", (name, data, "application/octet-stream"))])
    assert resp.status_code == 200, resp.text


def split_token() -> tuple[str, str, str]:
    """A secret and its two halves: programs rebuild it at run time, so the source file that
    carries the halves never contains the secret itself (a search for it cannot find the code)."""
    a, b = secrets.token_hex(8), secrets.token_hex(8)
    return a + b, a, b


def processes_mentioning(text: str) -> set[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state not in (b"Z", b"X"):
            found.add(int(name))
    return found
