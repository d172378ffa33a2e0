"""Finding 11: outputs in subdirectories are returned under their relative path; every output left
out is named in ``stderr``. Real server, real sidecars; embedded and Redis + S3 stores."""

from __future__ import annotations

import httpx
import pytest

from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}
CODE = """
import os
os.makedirs('charts/2024', exist_ok=True)
open('charts/2024/plot.png', 'wb').write(b'PNG')
open('top.txt', 'w').write('t')
open('.hidden', 'w').write('h')
open('a\\\\b.txt', 'w').write('b')
open('report\\u202etxt.exe', 'w').write('x')
os.symlink('/etc/passwd', 'charts/link')
"""


def test_nested_outputs_come_back_and_drops_are_named(security_server: ServerProcess) -> None:
    with httpx.Client(base_url=security_server.url, timeout=30) as client:
        r = client.post("/exec", json={"lang": "py", "code": CODE}, headers=H)
        assert r.status_code == 200, r.text
        body = r.json()
        names = {f["name"]: f["id"] for f in body["files"]}
        assert set(names) == {"charts/2024/plot.png", "top.txt"}, body
        d = client.get(f"/download/{body['session_id']}/{names['charts/2024/plot.png']}", headers=H)
        assert d.status_code == 200 and d.content == b"PNG"
        assert 'filename="plot.png"' in d.headers["content-disposition"]
        stderr = body["stderr"]
        assert ".hidden" in stderr and "a\\\\b.txt" in stderr and "report\\u202etxt.exe" in stderr
        assert "passwd" not in stderr and "link" not in stderr  # symlinks are not files the run made
