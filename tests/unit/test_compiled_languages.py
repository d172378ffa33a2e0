"""The API's list of compiled languages (their requests get ``KCR_COMPILE_TIMEOUT`` on top of the
run's timeout) is exactly the set whose sidecar runs start with a compile step."""

from __future__ import annotations

from kcr_trio.core.exec import ExecLimits
from kcr_trio.core.languages import COMPILED, LANGUAGES
from sidecar.languages import LANGUAGES as SPECS
from sidecar.languages import Context, Toolchain


def test_compiled_matches_the_sidecars_compile_steps() -> None:
    ctx = Context(tmp="/tmp/kcr-run-x", memory_mb=512, tools=Toolchain(None, None))
    with_compile = {code for code, spec in SPECS.items() if any(s.compile for s in spec.steps(ctx))}
    assert with_compile == COMPILED
    assert COMPILED <= set(LANGUAGES)


def test_compile_budget_only_for_compiled_languages() -> None:
    limits = ExecLimits(30, 30, 3, 1000, 10, 1024, 10_000, compile_timeout=45)
    assert limits.compile_budget("rs") == 45 and limits.compile_budget("py") == 0
    assert ExecLimits(30, 30, 3, 1000, 10, 1024, 10_000).compile_budget("rs") == 0
