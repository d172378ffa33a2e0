"""``http-cost`` end to end through ``scripts/bench_http.py``: real redis-server and S3 server, one
kcr-trio and the KubeCodeRun-shaped FastAPI peer, wrk as the load. Tiny windows: this checks that
every figure is produced for both targets and that nothing failed, not how fast anything is."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "bench_http.py"


def test_http_cost_side_by_side_with_the_peer(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is required (scripts/install.sh installs it)")
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "report"
    code = main(["--", "--runs", "1", "--duration", "1", "--warmup", "1", "--no-progress", "--max-time", "300",
                 "--http-routes", "health,files,upload-1k,download-10m", "--http-concurrency", "2",
                 "--report", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    section = report["scenarios"]["http-cost"]
    assert [(r["step"], r["target"]) for r in section["runs"]] == [
        (f"{route} c=2", target) for route in ("health", "files", "upload-1k", "download-10m")
        for target in ("kcr", "peer")]
    for run in section["runs"]:
        figures = run["figures"]
        assert figures["errors"] == 0 and figures["ok"] > 0, run
        assert figures["req/s"] > 0 and figures["server CPU ms/req"] > 0, run  # the server's pid was found
        assert figures["client CPU ms/req"] is not None and figures["peak RSS MiB"] > 10, run
        if run["step"].startswith("upload"):
            assert run["info"]["uploads_deleted"] == figures["ok"], run  # what the bench stored, it removed
