"""The bench's refusals and pure helpers (no servers needed)."""

from __future__ import annotations

import pytest

from kcr_trio.bench import cli
from kcr_trio.bench.metrics import delta, interesting, parse_prometheus
from kcr_trio.bench.stats import percentile, ratio, spread
from kcr_trio.bench.targets import TargetError, parse_target, parse_targets


def test_refuses_to_run_without_a_target(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--scenario", "exec-latency"])
    assert exc.value.code == 2
    assert "no --target given" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["A", "A=ftp://x", "A=http://", "1A=http://h", "A=http://h/?q=1"])
def test_bad_targets_are_refused(spec: str) -> None:
    with pytest.raises(TargetError):
        parse_target(spec)


def test_target_key_sources(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BENCH_KEY_X", "from-env")
    (tmp_path / "k").write_text("from-file\n")
    a, b, c = parse_targets(["A=http://127.0.0.1:1,env:BENCH_KEY_X", f"B=https://h.example/api,@{tmp_path / 'k'}",
                             "C=http://localhost:2"])
    assert (a.key, b.key, c.key) == ("from-env", "from-file", None)
    assert a.is_loopback and not b.is_loopback and c.is_loopback and b.prefix == "/api" and b.port == 443
    assert "from-env" not in str(a.public())
    with pytest.raises(TargetError):
        parse_targets(["A=http://h:1", "A=http://h:2"])


def test_unknown_scenario_and_bounds_are_refused(capsys) -> None:
    for argv in (["--scenario", "nope"], ["--scenario", "concurrency", "--concurrency", "0"],
                 ["--scenario", "upload-exec", "--sizes", "200MB"], ["--scenario", "keepalive", "--keepalive-seconds", "4"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["--target", "A=http://127.0.0.1:9", *argv])
        assert exc.value.code == 2


def test_missing_sub_benchmark_is_a_clear_message(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.DELEGATES, "prewarm", ("kcr_trio_no_such_module.bench", "pre-warm benchmark"))
    assert cli.main(["prewarm"]) == 2
    assert "not part of this installation" in capsys.readouterr().err


def test_list(capsys) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("exec-latency", "concurrency", "upload-exec", "keepalive", "disconnect-storm", "slow-clients",
                 "files-rps", "conformance", "prewarm", "engine"):
        assert name in out
    assert "k8s-reclaim" not in out  # moved to tests/support/kube_reclaim.py (drives backends directly)


def test_stats() -> None:
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    s = spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["runs"]) == (2.0, 1.0, 3.0, 3)
    assert ratio(2.0, 4.0) == 0.5 and ratio(1.0, 0) is None and ratio(None, 1.0) is None


def test_prometheus_delta() -> None:
    before = parse_prometheus('# HELP x\nkcr_client_disconnects_total{route="/exec"} 2\nother 1\n')
    after = parse_prometheus('kcr_client_disconnects_total{route="/exec"} 5\nother 1\nkcr_exec_killed_on_cancel_total 3\n'
                             'kcr_client_disconnect_after_seconds_bucket{le="1"} 4\n')
    d = delta(before, after)
    assert d is not None and d['kcr_client_disconnects_total{route="/exec"}'] == 3 and "other" not in d
    assert set(interesting(d)) == {'kcr_client_disconnects_total{route="/exec"}', "kcr_exec_killed_on_cancel_total"}
    assert delta(None, after) is None


def test_keys_are_redacted_from_the_recorded_command_line() -> None:
    from kcr_trio.bench.runner import redact_argv

    argv = ["--target", "A=http://x:1,secret-a", "--target=B=http://y:2,secret-b", "--target", "C=http://z:3"]
    assert redact_argv(argv) == ["--target", "A=http://x:1,<key>", "--target=B=http://y:2,<key>", "--target", "C=http://z:3"]
