"""Which sandbox mode the local executor and the sidecar choose (the probe replaced by a stub)."""

from __future__ import annotations

from pathlib import Path

import pytest

import sidecar.sandbox as sandbox
from kcr_trio.backends.local_executor import LocalExecutorSettings, SandboxUnavailable, decide_sandbox
from kcr_trio.config import Settings


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(_env_file=None, kcr_data_dir=tmp_path, **kw)  # type: ignore[arg-type]


@pytest.fixture
def probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "probe", lambda **kw: "bwrap failed: no user namespaces")


@pytest.fixture
def probe_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "probe", lambda **kw: None)


def test_auto_uses_bwrap_when_it_works(tmp_path: Path, probe_works: None) -> None:
    assert decide_sandbox(settings(tmp_path), LocalExecutorSettings(_env_file=None)) == (True, None)


def test_auto_refuses_without_a_sandbox(tmp_path: Path, probe_fails: None) -> None:
    with pytest.raises(SandboxUnavailable, match=r"no user namespaces.*refusing to start the local executor"):
        decide_sandbox(settings(tmp_path), LocalExecutorSettings(_env_file=None))


def test_auto_falls_back_only_when_trusted(tmp_path: Path, probe_fails: None) -> None:
    sandboxed, warning = decide_sandbox(settings(tmp_path, kcr_unsandboxed_trusted=True),
                                        LocalExecutorSettings(_env_file=None))
    assert sandboxed is False and warning is not None
    assert "UNSANDBOXED" in warning and "no user namespaces" in warning


def test_bwrap_mode_never_falls_back(tmp_path: Path, probe_fails: None) -> None:
    with pytest.raises(SandboxUnavailable):
        decide_sandbox(settings(tmp_path, kcr_sandbox="bwrap", kcr_unsandboxed_trusted=True),
                       LocalExecutorSettings(_env_file=None))


def test_none_requires_trust(tmp_path: Path, probe_works: None) -> None:
    with pytest.raises(SandboxUnavailable, match="KCR_UNSANDBOXED_TRUSTED"):
        decide_sandbox(settings(tmp_path, kcr_sandbox="none"), LocalExecutorSettings(_env_file=None))
    sandboxed, warning = decide_sandbox(settings(tmp_path, kcr_sandbox="none", kcr_unsandboxed_trusted=True),
                                        LocalExecutorSettings(_env_file=None))
    assert sandboxed is False and warning and "UNSANDBOXED" in warning


def test_sidecar_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = dict(allow_network=False, ro_paths="", language="bash", python="/usr/bin/python3",
                  node_path=None, uid=None, gid=None, tmp_root=str(tmp_path))
    assert sandbox.for_sidecar("none", str(tmp_path), **common) == (None, None)  # type: ignore[arg-type]
    with pytest.raises(sandbox.SandboxError, match="unknown sandbox mode"):
        sandbox.for_sidecar("docker", str(tmp_path), **common)  # type: ignore[arg-type]
    monkeypatch.setattr(sandbox, "probe", lambda **kw: "bwrap failed: nope")
    with pytest.raises(sandbox.SandboxError, match="nope"):
        sandbox.for_sidecar("bwrap", str(tmp_path), **common)  # type: ignore[arg-type]
    sb, warning = sandbox.for_sidecar("auto", str(tmp_path), **common)  # type: ignore[arg-type]
    assert sb is None and warning and "WITHOUT a sandbox" in warning
    monkeypatch.setattr(sandbox, "probe", lambda **kw: None)
    sb, warning = sandbox.for_sidecar("bwrap", str(tmp_path), **common)  # type: ignore[arg-type]
    assert isinstance(sb, sandbox.Sandbox) and warning is None
