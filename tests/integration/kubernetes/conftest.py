"""Fixtures for the Kubernetes executor tests: an emulated API server whose pods are real
sidecar processes, and the real executor (official ``kubernetes`` client) pointed at it."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from kcr_trio.backends.kubernetes_executor import (
    KubernetesExecutor,
    KubernetesSettings,
    open_kubernetes_executor,
)
from kcr_trio.config import Settings
from kcr_trio.core.languages import LANGUAGES
from tests.support.kube_emulator import KubeEmulator

NS = "kcr"
POOLS = {f"pod_pool_{lang}": 0 for lang in LANGUAGES}


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[KubeEmulator]:
    emu = KubeEmulator(tmp_path / "cluster", namespaces=(NS,))
    with emu:
        yield emu
    # Every pod process (and its tree) is gone once the emulator is closed.
    assert all(p.proc is None or p.proc.poll() is not None for p in emu._pods.values())


@pytest.fixture
def kubeconfig(emulator: KubeEmulator, tmp_path: Path) -> Path:
    return emulator.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)


def make_settings(kubeconfig: Path, pools: dict[str, int] | None = None, **k8s: Any) -> tuple[Settings, KubernetesSettings]:
    sizes = dict(POOLS)
    sizes.update({f"pod_pool_{lang}": n for lang, n in (pools or {}).items()})
    settings = Settings(_env_file=None, **sizes, kcr_busy_retry_after=3)
    options = {"k8s_image_registry": "registry.test/kcr-trio", "k8s_image_tag": "test", **k8s}
    ks = KubernetesSettings(_env_file=None, kubeconfig=str(kubeconfig), k8s_namespace=NS, **options)
    return settings, ks


@asynccontextmanager
async def executor_for(kubeconfig: Path, pools: dict[str, int] | None = None, **k8s: Any) -> AsyncIterator[KubernetesExecutor]:
    settings, ks = make_settings(kubeconfig, pools, **k8s)
    async with open_kubernetes_executor(settings, ks) as executor:
        yield executor


async def until(predicate: Any, timeout: float = 15.0, message: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await trio.sleep(0.02)


def descendants(pid: int) -> set[int]:
    """All processes below ``pid`` (by ppid chains in /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2:][:1] != b"Z"


def ready_pods(emu: KubeEmulator, lang: str | None = None) -> list[dict[str, Any]]:
    sel = "kubecoderun.io/variant=trio" + (f",kubecoderun.io/language={lang}" if lang else "")
    return [
        p for p in emu.pods(NS, sel)
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]
