"""The import graph keeps the arrows the design wants (static: every ``import`` in the source,
including the ones inside functions, resolved to module names).

* The shipped bench talks to servers over public HTTP: no arrow into ``kcr_trio.backends``.
* Shipped code never imports the test tree (``tests.*`` is not installed).
* ``kcr_trio.core`` is the pure domain: no arrow into the HTTP edge, the backends or the bench.
* The sidecar ships alone in language images: it imports nothing from ``kcr_trio``.
* The backends reach into the sidecar only through the modules listed in ``BACKENDS_TO_SIDECAR``:
  the local executor through ``sidecar.host``, the sidecar's one public module for a host that
  runs sidecars on its own machine (its internals stay free to change).
* Same-shape backends: each client library is imported by one client module only (a store module
  holds store logic and reaches its library through that module and the asyncio bridge); the
  warm-pool model both executors share knows no backend; the Kubernetes executor's concept modules
  never import the executor that composes them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# backends module -> the sidecar modules it may import (see the module docstring).
# The local executor is these modules (split by concept: settings, sidecar processes, pools).
LOCAL_EXECUTOR = ("kcr_trio.backends.local_executor", "kcr_trio.backends.local_sidecars",
                  "kcr_trio.backends.local_settings", "kcr_trio.backends.sandbox_dirs")
BACKENDS_TO_SIDECAR = {mod: {"sidecar", "sidecar.host"} for mod in LOCAL_EXECUTOR}

# client library -> the one module that may import it.
CLIENT_LIBRARIES = {
    "trio_asyncio": "kcr_trio.backends.aio_bridge",
    "redis": "kcr_trio.backends.redis_client",
    "miniopy_async": "kcr_trio.backends.s3_client",
    "aiohttp": "kcr_trio.backends.s3_client",
    "kubernetes": "kcr_trio.backends.kube_adapter",
}
KUBE_CONCEPTS = ("kube_settings", "kube_watch", "kube_lifecycle", "kube_sandbox", "kube_sweep")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (``from a import b`` yields ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"


def graph(top: str) -> dict[str, set[str]]:
    return {module_name(p): set(imports(p)) for p in sorted((ROOT / top).rglob("*.py"))}


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(top: str, source: str, target: str) -> dict[str, set[str]]:
    found = {}
    for mod, deps in graph(top).items():
        if inside(mod, source):
            bad = {d for d in deps if inside(d, target)}
            if bad:
                found[mod] = bad
    return found


def test_the_scanner_sees_imports_inside_functions() -> None:
    deps = graph("kcr_trio")["kcr_trio.cli"]
    assert "sidecar.__main__" in deps  # imported inside a function body


def test_the_bench_does_not_import_backends_or_tests() -> None:
    assert offenders("kcr_trio", "kcr_trio.bench", "kcr_trio.backends") == {}
    assert offenders("kcr_trio", "kcr_trio.bench", "tests") == {}


def test_shipped_code_does_not_import_tests() -> None:
    assert offenders("kcr_trio", "kcr_trio", "tests") == {}
    assert offenders("sidecar", "sidecar", "tests") == {}


def test_core_stays_pure() -> None:
    for target in ("kcr_trio.api", "kcr_trio.backends", "kcr_trio.bench", "kcr_trio.app", "kcr_trio.config"):
        assert offenders("kcr_trio", "kcr_trio.core", target) == {}, target


def test_the_sidecar_stands_alone() -> None:
    assert offenders("sidecar", "sidecar", "kcr_trio") == {}


def test_backends_reach_the_sidecar_only_through_known_modules() -> None:
    used = offenders("kcr_trio", "kcr_trio.backends", "sidecar")
    assert used  # the scan does see these imports
    for mod, deps in used.items():
        allowed = BACKENDS_TO_SIDECAR.get(mod, set())
        # ``from sidecar.limits import reachable_by`` also yields ``sidecar.limits.reachable_by``.
        extra = {d for d in deps if d not in allowed and d.rsplit(".", 1)[0] not in allowed - {"sidecar"}}
        assert not extra, f"{mod} imports sidecar internals outside its allowance: {sorted(extra)}"


def test_only_the_local_executor_reaches_the_sidecar_and_only_through_its_public_module() -> None:
    used = offenders("kcr_trio", "kcr_trio.backends", "sidecar")
    assert set(used) == set(LOCAL_EXECUTOR)
    # ``from sidecar import host`` yields ``sidecar`` and ``sidecar.host``; nothing deeper.
    public = {"sidecar.host", *(f"sidecar.host.{n}" for n in __import__("sidecar.host").host.__all__)}
    for mod in LOCAL_EXECUTOR:
        assert used[mod] - {"sidecar"} <= public, mod


def test_each_client_library_has_one_client_module() -> None:
    for library, owner in CLIENT_LIBRARIES.items():
        assert set(offenders("kcr_trio", "kcr_trio", library)) == {owner}, library


def test_the_warm_pool_model_knows_no_backend() -> None:
    deps = graph("kcr_trio")["kcr_trio.backends.warm_pool"]
    assert deps  # the scan does see its imports
    assert not {d for d in deps if inside(d, "kcr_trio") or inside(d, "httpx") or inside(d, "sidecar")}


def test_kube_concept_modules_do_not_import_the_executor() -> None:
    modules = graph("kcr_trio")
    for name in KUBE_CONCEPTS:
        deps = modules[f"kcr_trio.backends.{name}"]
        assert not {d for d in deps if inside(d, "kcr_trio.backends.kubernetes_executor")}, name
