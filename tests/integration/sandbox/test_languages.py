"""All 13 toolchains work inside the sandbox's read-only view (compilers, runtimes, their /etc)."""

from __future__ import annotations

import pytest

from tests.integration.sidecar.test_languages import COMPILE_ERROR, HELLO, SLOW
from tests.support.sandbox import run, sandboxed

pytestmark = pytest.mark.integration


def _param(lang: str):  # type: ignore[no-untyped-def]
    return pytest.param(lang, marks=pytest.mark.slow) if lang in SLOW else lang


@pytest.mark.parametrize("lang", [_param(lang) for lang in HELLO])
async def test_language_runs_sandboxed(lang: str) -> None:
    code, expected = HELLO[lang]
    async with sandboxed(lang) as (_sc, client):
        res = await run(client, code, timeout=120)
        assert res["exit_code"] == 0, res["stderr"]
        assert res["stdout"] == expected and res["stderr"] == ""
        assert res["generated"] == []  # binaries and caches live in the private run dir
        if lang in COMPILE_ERROR:
            res = await run(client, COMPILE_ERROR[lang], timeout=120)
            assert res["exit_code"] != 0 and res["stderr"].strip() and res["stdout"] == ""
