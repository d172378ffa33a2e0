"""Schemathesis against our own OpenAPI document: no 5xx, no response outside the document.

Runs the schemathesis command line (every check: server errors, status codes, content types,
response schemas, negative-data rejection, unsupported methods, ignored auth, stateful links)
against an in-process server with the in-process executor, with a bounded example count and a fixed
seed, so CI stays fast and a failure reproduces. ``KCR_FUZZ_EXAMPLES`` raises the count locally.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from kcr_trio.core.model import RunResult
from tests.support.ops import ops_server
from tests.support.server import TEST_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = os.environ.get("KCR_FUZZ_EXAMPLES", "25")
_WARNINGS = ("missing_auth", "missing_test_data", "validation_mismatch", "missing_deserializer",
             "unused_openapi_auth", "unsupported_regex", "method_not_allowed", "low_valid_rate")


class EchoProgram:
    """Whatever the fuzzer sends runs instantly and writes one output file."""

    running = 0
    cancelled = 0

    async def __call__(self, code: str, files: dict[str, bytes]) -> RunResult:
        await trio.lowlevel.checkpoint()
        files["out.txt"] = b"fuzz"
        return RunResult(0, "ok", "")


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    async with ops_server(
        tmp_path / "server",
        program=EchoProgram(),  # type: ignore[arg-type]
        max_file_size_mb=1,
        kcr_auth_failures_per_minute=0,  # the ignored-auth check sends wrong keys on purpose
    ) as (url, _, _):
        workdir = tmp_path / "st"
        workdir.mkdir()
        result = await trio.run_process(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
                "--header", f"X-API-Key: {TEST_KEY}",
                "--checks", "all",
                "--max-examples", EXAMPLES,
                "--seed", "20261202",
                "--workers", "1",
                "--generation-database", "none",
                "--request-timeout", "20",
                "--no-color",
            ],
            cwd=workdir,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-8000:]
    assert "No issues found" in output, output[-8000:]


def test_schemathesis_against_real_sidecars(tmp_path: Path) -> None:
    """A few examples per operation through real sidecars running whatever the fuzzer wrote."""
    pytest.importorskip("kcr_trio.backends.local_executor")
    import subprocess

    from tests.support.server import server_process

    env = {"MAX_EXECUTION_TIME": "5", "POD_POOL_PY": "1", "POD_POOL_JS": "1", "POD_POOL_BASH": "1",
           "MAX_FILE_SIZE_MB": "1", "KCR_AUTH_FAILURES_PER_MINUTE": "0"}
    with server_process(env) as server:
        done = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                "--header", f"X-API-Key: {TEST_KEY}",
                "--checks", "all",
                "--max-examples", os.environ.get("KCR_FUZZ_REAL_EXAMPLES", "4"),
                "--seed", "20261202",
                "--workers", "1",
                "--generation-database", "none",
                "--request-timeout", "60",
                # Four examples per operation rarely chain an upload into a delete of the same
                # file, so "missing test data" is expected here; the in-process run above, with
                # more examples, keeps every warning.
                "--warnings", ",".join(w for w in _WARNINGS if w != "missing_test_data"),
                "--no-color",
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
        )
        errors = [line for line in server.log_lines() if '"status":5' in line and '"path":"/ready"' not in line]
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "No issues found" in output, output[-8000:]
    assert errors == []
