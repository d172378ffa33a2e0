"""Name rules and generated-file detection of the sidecar (pure logic)."""

from __future__ import annotations

import os

import pytest

from sidecar import files
from sidecar.config import parse


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", "a\x00b", "x" * 256])
def test_plain_name_rejects(name: str) -> None:
    assert not files.plain_name(name)


def test_upload_name() -> None:
    assert files.upload_name("../../etc/passwd") == "passwd"
    assert files.upload_name("C:\\Users\\me\\data.csv") == "data.csv"
    assert files.upload_name(".bashrc") is None
    assert files.upload_name("dir/") is None
    assert files.upload_name(None) is None


def test_changed_detects_created_and_modified_only() -> None:
    before = {"in.csv": (3, 100, 1), "mod.txt": (3, 100, 2), "replaced.txt": (3, 100, 3)}
    after = {"in.csv": (3, 100, 1), "mod.txt": (5, 200, 2), "replaced.txt": (3, 100, 9),
             "new.png": (10, 300, 4), "code.py": (1, 300, 5), "Code.class": (9, 300, 6)}
    got = files.changed(before, after, frozenset({"code.py", "Code.class"}))
    assert [e.name for e in got] == ["mod.txt", "new.png", "replaced.txt"]


def test_snapshot_skips_symlinks_and_dirs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f.txt").write_text("x")
    os.symlink("/etc/passwd", tmp_path / "link")
    (tmp_path / "d").mkdir()
    assert list(files.snapshot(str(tmp_path))) == ["f.txt"]
    assert files.open_regular(str(tmp_path), "link") is None
    assert files.open_regular(str(tmp_path), "d") is None
    opened = files.open_regular(str(tmp_path), "f.txt")
    assert opened is not None and opened[1] == 1
    os.close(opened[0])


def test_config_env_names_and_flags() -> None:
    env = {"LANGUAGE": "rs", "WORKING_DIR": "/data", "RUNNER_PORT": "9000", "MAX_EXECUTION_TIME": "300",
           "MAX_OUTPUT_SIZE": "2048", "SIDECAR_MAX_MEMORY_MB": "1024", "SIDECAR_PREWARM": "false"}
    cfg = parse([], env)
    assert (cfg.language, cfg.working_dir, cfg.port, cfg.max_execution_time) == ("rs", "/data", 9000, 300)
    assert cfg.max_output_size == 2048 and cfg.max_memory_mb == 1024 and cfg.prewarm is False
    cfg = parse(["--port", "1", "--prewarm", "--language", "py"], env)
    assert cfg.port == 1 and cfg.prewarm is True and cfg.language == "py"
    assert parse([], {}).working_dir == "/mnt/data" and parse([], {}).max_execution_time == 600
