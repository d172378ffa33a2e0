"""Error bodies the 3.9.x client can read: coded 429s, and every body far below 64 KiB (§1.0.1)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.ops import H, ops_server

pytestmark = pytest.mark.integration


async def test_a_huge_validation_error_is_capped(tmp_path: Path) -> None:
    bad_files = [{"id": 1, "name": 2} for _ in range(5000)]  # 5000 × 3 validation details
    async with ops_server(tmp_path) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(url + "/exec", json={"code": "x", "lang": "py", "files": bad_files}, headers=H)
            assert r.status_code == 422
            assert len(r.content) <= 32 * 1024
            body = r.json()
            assert body["error"] == "Request validation failed" and 1 <= len(body["details"]) < 15000
