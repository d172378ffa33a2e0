"""``kcr-trio bench`` end to end: every scenario, briefly, against two real servers (A with the
hang-up mitigations, B without), through the CLI entry point; then the report files are checked and
the figures that must tell A and B apart are asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from kcr_trio.bench.cli import main
from tests.support.server import TEST_KEY

pytestmark = pytest.mark.integration

TINY = ["--runs", "1", "--no-progress", "--max-time", "120", "--warmup", "1"]


def run_cli(target_args: list[str], tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "report"
    code = main([*target_args, *TINY, "--report", str(out), *extra])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "summary.md").read_text()
    assert md.startswith("# kcr-trio bench report") and "| A |" in md
    for names in report["plots"].values():
        for name in names:
            png = (out / name).read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 5000
            assert f"]({name})" in md
    assert report["truncated"] is False
    assert all(t["key"] == "set" for t in report["targets"])
    assert "test-key" not in (out / "report.json").read_text()  # keys never reach the report
    return report


def figure(report: dict[str, Any], scenario: str, name: str, target: str, step: str | None = None) -> Any:
    for f in report["scenarios"][scenario]["summary"]["figures"]:
        if f["figure"] == name and (step is None or f["step"] == step):
            return f["targets"][target]["median"]
    raise AssertionError(f"no figure {name!r} in {scenario}")


def runs(report: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    return report["scenarios"][scenario]["runs"]


def test_exec_latency(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "exec-latency", "--requests", "4", "--languages", "py,js")
    assert [(x["step"], x["target"]) for x in runs(r, "exec-latency")] == [("py", "A"), ("py", "B"), ("js", "A"), ("js", "B")]
    for t in "AB":
        for lang in ("py", "js"):
            assert figure(r, "exec-latency", "ok", t, lang) == 4
            assert figure(r, "exec-latency", "errors", t, lang) == 0
            assert 0 < figure(r, "exec-latency", "p50 ms", t, lang) < 5000
    assert r["plots"]["exec-latency"] == ["exec-latency-cdf.png"]


def test_concurrency(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "concurrency", "--concurrency", "1,2", "--duration", "0.5")
    for t in "AB":
        for step in ("c=1", "c=2"):
            assert figure(r, "concurrency", "req/s", t, step) > 0
            assert figure(r, "concurrency", "errors", t, step) == 0
    assert "concurrency-throughput.png" in r["plots"]["concurrency"]


def test_upload_exec_reports_sizes_and_rejections(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "upload-exec", "--sizes", "1KB,512KB,2MB", "--uploads-per-run", "1")
    for t in "AB":
        assert figure(r, "upload-exec", "ok", t, "1KB") == 1 and figure(r, "upload-exec", "ok", t, "512KB") == 1
        # The servers run with MAX_FILE_SIZE_MB=1: a 2 MB upload is a reported rejection, not an error.
        assert figure(r, "upload-exec", "rejected", t, "2MB") == 1
        assert figure(r, "upload-exec", "errors", t, "2MB") == 0


@pytest.mark.slow
def test_keepalive_tells_the_servers_apart(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "keepalive", "--keepalive-seconds", "5.5", "--keepalive-clients", "2")
    assert figure(r, "keepalive", "ok", "A") == 2 and figure(r, "keepalive", "hang-ups", "A") == 0
    assert figure(r, "keepalive", "hang-ups", "B") == 2 and figure(r, "keepalive", "ok", "B") == 0
    b_run = next(x for x in runs(r, "keepalive") if x["target"] == "B")
    assert all(4800 <= ms <= 7000 for ms in b_run["samples"]["hang-up at ms"])  # the 5 s signature
    assert r["plots"]["keepalive"] == ["keepalive-hangups.png"]


@pytest.mark.slow
def test_disconnect_storm_measures_kills_and_recovery(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "disconnect-storm", "--storm-clients", "3",
                "--storm-run-seconds", "4", "--storm-leave", "0.8-1.5")
    for t in "AB":
        run = next(x for x in runs(r, "disconnect-storm") if x["target"] == t)
        f = run["figures"]
        assert f["left mid-run"] == 3 and f["client errors"] == 0
        # kcr-trio cancels on disconnect whatever the wire settings: nothing keeps running.
        assert f["wasted s (files)"] == 0 and f["outputs stored"] == 0
        assert f["still running at end"] == 0
        assert f["recovery s"] is not None and f["recovery s"] < 4
        assert run["samples"]["kill ms"], run  # the marked processes were seen and their deaths timed
        assert max(run["samples"]["kill ms"]) < 2000
    assert "disconnect-storm-waste.png" in r["plots"]["disconnect-storm"]


def test_slow_clients(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "slow-clients", "--duration", "1", "--idle-connections", "20",
                "--slow-senders", "3", "--slow-interval", "0.2")
    for t in "AB":
        assert figure(r, "slow-clients", "idle opened", t) == 20
        assert figure(r, "slow-clients", "ok", t) > 0 and figure(r, "slow-clients", "errors", t) == 0


def test_files_rps(target_args, tmp_path) -> None:
    r = run_cli(target_args, tmp_path, "--scenario", "files-rps", "--files-concurrency", "2", "--duration", "0.5")
    for t in "AB":
        assert figure(r, "files-rps", "req/s", t) > 0 and figure(r, "files-rps", "errors", t) == 0


def has_mnt_data(url: str) -> bool:
    body = {"code": "import os; print(os.path.isdir('/mnt/data'))", "lang": "py"}
    return httpx.post(url + "/exec", json=body, headers={"X-API-Key": TEST_KEY}, timeout=30).json()["stdout"] == "True\n"


def test_conformance_table(bench_servers, target_args, tmp_path) -> None:
    # 04 (waits for MAX_EXECUTION_TIME) and 24 (Node, > 5 s; the keepalive scenario covers it) are
    # skipped to keep this short; every other contract case must pass on both servers.
    r = run_cli(target_args, tmp_path, "--scenario", "conformance", "--max-file-mb", "1",
                "--skip-case", "04", "--skip-case", "24")
    # Cases 13/14/16 use /mnt/data as LibreChat's code does; a local executor without its sandbox
    # wrapper has no /mnt/data yet, and then (only then) those cases may fail.
    pending = set() if has_mnt_data(bench_servers[0].url) else {"13", "14", "16"}
    for run in runs(r, "conformance"):
        cases = {c["case"]: c for c in run["info"]["cases"]}
        assert len(cases) == 24
        failed = {k: c["detail"] for k, c in cases.items() if c["status"] == "fail"}
        assert set(failed) <= pending, (run["target"], failed)
        assert cases["04"]["status"] == cases["24"]["status"] == "skip"
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| 01 | minimal exec | ✅ pass | ✅ pass |" in md and "| 04 | timeout is 200 | ⏭ skip | ⏭ skip |" in md
