"""The embedded default needs none of the ``prod`` extras (README: ``pip install . && kcr-trio serve``).

CI installs ``.[test]``, which pulls in ``prod`` (trio-asyncio, redis, miniopy-async, kubernetes),
so an import of one of them on the default path would pass every other test and still break a user's
first start. Here the server runs with those packages made unimportable (a ``sitecustomize`` on its
``PYTHONPATH`` puts a blocking finder first on ``sys.meta_path``) and must start, answer ``/ready``
and run code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.server import TEST_KEY, server_process

PROD_ONLY = ("trio_asyncio", "redis", "miniopy_async", "kubernetes", "aiohttp")

BLOCKER = f'''
import sys


class _ProdExtraNotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROD_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (the prod extra is not installed)")
        return None


sys.meta_path.insert(0, _ProdExtraNotInstalled())
'''


def test_embedded_default_serves_without_the_prod_extras(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    repo = Path(__file__).resolve().parents[3]
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), str(repo), os.environ.get("PYTHONPATH", "")) if p)
    # The blocker is active for an interpreter started like the server (else this test proves nothing).
    check = subprocess.run([sys.executable, "-c", "import trio_asyncio"], env={**os.environ, "PYTHONPATH": pythonpath},
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "prod extra is not installed" in check.stderr, check.stderr
    with server_process({"PYTHONPATH": pythonpath}) as server:
        ready = httpx.get(f"{server.url}/ready", timeout=30)
        assert ready.status_code == 200, ready.text
        answer = httpx.post(f"{server.url}/exec", json={"lang": "py", "code": "print(6 * 7)"},
                            headers={"X-API-Key": TEST_KEY}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stdout"] == "42\n"
