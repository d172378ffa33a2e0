"""``X-CodeAPI-Expected-Profile`` fails closed (contract §3.1); in-process servers, real sockets."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kcr_trio.app import runtime_store
from tests.support.ops import H, ops_server
from tests.support.server import make_settings

pytestmark = pytest.mark.integration

EXEC = {"code": "ok", "lang": "py"}


def expect(profile: str) -> dict[str, str]:
    return {**H, "X-CodeAPI-Expected-Profile": profile}


async def test_default_deployment(tmp_path: Path) -> None:
    async with ops_server(tmp_path) as (url, program, _):
        async with httpx.AsyncClient(timeout=10) as client:
            for headers in (H, expect("default"), expect("Default")):
                r = await client.post(url + "/exec", json=EXEC, headers=headers)
                assert r.status_code == 200 and r.headers["x-codeapi-execution-profile"] == "default"
                assert "runtime_session_id" not in r.json()
            # A hint is ignored (not even validated) in the default profile, as the official server does.
            r = await client.post(url + "/exec", json={**EXEC, "runtime_session_hint": "not valid!"}, headers=H)
            assert r.status_code == 200 and "runtime_session_id" not in r.json()

            before = program.running
            r = await client.post(url + "/exec", json=EXEC, headers=expect("stateful"))
            assert r.status_code == 409
            body = r.json()
            assert {k: body[k] for k in ("error", "message", "expected_profile", "actual_profile")} == {
                "error": "execution_profile_mismatch",
                "message": "Expected the stateful execution profile, but reached default",
                "expected_profile": "stateful", "actual_profile": "default"}
            assert r.headers["x-codeapi-execution-profile"] == "default"
            assert program.running == before  # refused before anything was queued

            r = await client.post(url + "/exec", json=EXEC, headers=expect("turbo"))
            assert r.status_code == 400 and r.json()["error"] == "invalid_execution_profile"
            # Every /exec route checks it (the PTC routes too), and every response names the profile.
            r = await client.post(url + "/exec/programmatic", json={}, headers=expect("stateful"))
            assert r.status_code == 409 and r.json()["error"] == "execution_profile_mismatch"
            r = await client.get(url + "/health")
            assert r.headers["x-codeapi-execution-profile"] == "default"


async def test_stateful_only_deployment_refuses_default(tmp_path: Path) -> None:
    async with ops_server(tmp_path, kcr_execution_profiles="stateful") as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", json=EXEC, headers=expect("default"))
            assert r.status_code == 409 and r.json()["actual_profile"] == "stateful"
            # No header: the deployment's own profile, which needs a hint.
            r = await client.post(url + "/exec", json=EXEC, headers=H)
            assert r.status_code == 400 and r.json()["error"] == "runtime_session_hint_required"
            for hint in ("has space", "x" * 129, 42, "ünï"):
                r = await client.post(url + "/exec", json={**EXEC, "runtime_session_hint": hint}, headers=H)
                assert r.status_code == 400, hint
                assert r.json()["error"].startswith("runtime_session_hint must be")
            r = await client.post(url + "/exec", json={**EXEC, "runtime_session_hint": "v2:user:" + "a" * 32},
                                  headers=H)
            assert r.status_code == 200 and r.headers["x-codeapi-execution-profile"] == "stateful"
            assert r.json()["runtime_session_id"].startswith("rt_") and r.json()["runtime_status"] == "new"


def test_bad_profile_setting_stops_start_up(tmp_path: Path) -> None:
    for value in ("default,turbo", " , "):
        with pytest.raises(ValueError, match="KCR_EXECUTION_PROFILES"):
            runtime_store(make_settings(tmp_path, kcr_execution_profiles=value), None, None)
