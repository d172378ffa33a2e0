"""The ``Executor`` Protocol carries what the app reads from an executor (``core/interfaces.py``).

``warnings``, ``ptc_capable`` and ``capacity`` used to be read with ``getattr`` and a default, so an
executor that lacked one (or misspelt it) silently got the default. They are Protocol members now:
mypy checks every executor against them where the app composes it (``app.open_services``), and
these tests pin the values each executor declares and that nothing reads them by name again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import pytest

from kcr_trio.backends.kube_sandbox import PodSandbox
from kcr_trio.backends.kube_watch import TrackedPod
from kcr_trio.backends.kubernetes_executor import KubernetesExecutor
from kcr_trio.backends.local_executor import LocalExecutor
from kcr_trio.backends.memory_executor import MemoryExecutor, MemorySandbox
from kcr_trio.backends.ptc_sidecar import _endpoint
from kcr_trio.backends.sidecar_client import SidecarSandbox
from kcr_trio.core.errors import ApiError
from kcr_trio.core.interfaces import Executor
from kcr_trio.core.model import RunResult

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {"warnings", "ptc_capable", "capacity"}


async def _program(code: str, files: dict[str, bytes]) -> RunResult:
    raise AssertionError("not run")


def test_protocol_declares_the_extras() -> None:
    members = {name for name in vars(Executor) if not name.startswith("_")}
    assert EXTRAS <= members


def test_memory_executor_satisfies_the_protocol() -> None:
    ex = MemoryExecutor(_program, capacity=3)
    assert isinstance(ex, Executor)
    assert (ex.warnings, ex.ptc_capable, ex.capacity) == ([], False, 3)


def test_class_level_declarations() -> None:
    # Pods are made on demand (no slot count) and run the sidecar; local sidecars carry PTC too.
    assert KubernetesExecutor.capacity is None and KubernetesExecutor.ptc_capable is True
    assert LocalExecutor.ptc_capable is True


def test_nothing_reads_an_executor_extra_by_name() -> None:
    found = []
    for path in sorted((ROOT / "kcr_trio").rglob("*.py")):
        if "bench" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in EXTRAS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


async def test_ptc_finds_the_sidecar_through_the_public_endpoint() -> None:
    """PTC talks to a sandbox's sidecar through ``SidecarEndpoint`` (no reach into privates): a
    sidecar sandbox, also inside a pod, has one; the in-process twin has none (409 capability)."""
    async with httpx.AsyncClient() as client:
        sidecar = SidecarSandbox("http://10.0.0.7:8080/", client=client)
        assert _endpoint(sidecar) == ("http://10.0.0.7:8080", client)
        pod = PodSandbox(TrackedPod("p", "py"), sidecar, runner=False, memory_limit="512Mi")
        assert _endpoint(pod) == ("http://10.0.0.7:8080", client)
        for sandbox in (MemorySandbox(_program),
                        PodSandbox(TrackedPod("q", "py"), MemorySandbox(_program), runner=False, memory_limit="1Gi")):
            with pytest.raises(ApiError) as caught:
                _endpoint(sandbox)
            assert (caught.value.status, caught.value.message) == (409, "unsupported_capability")
