"""Finding 6: Unicode names are kept, colliding inputs get unique names with a note in ``stderr``,
and no input is dropped silently. Real server, real sidecars; embedded and Redis + S3 stores."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}
READ_ALL = (
    "import os, json\n"
    "print(json.dumps({n: open(n, encoding='utf-8').read() for n in sorted(os.listdir('.')) if n != 'code.py'},"
    " ensure_ascii=False))"
)


@pytest.fixture
def client(security_server: ServerProcess):
    with httpx.Client(base_url=security_server.url, timeout=30) as c:
        yield c


def _upload(client: httpx.Client, parts: list[tuple[str, bytes]]) -> dict:
    files = [("files", (name, data, "text/plain")) for name, data in parts]
    r = client.post("/upload", files=files, headers={**H, "User-Id": "names-user"})
    assert r.status_code == 200, r.text
    return r.json()


def _run(client: httpx.Client, up: dict, extra_refs: list[dict] | None = None) -> dict:
    refs = [{"id": f["fileId"], "session_id": up["session_id"], "name": f["filename"]} for f in up["files"]]
    r = client.post("/exec", json={"lang": "py", "code": READ_ALL, "files": refs + (extra_refs or [])}, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def test_unicode_names_are_kept_and_distinct(client) -> None:
    up = _upload(client, [("数据.csv", b"a,b"), ("报告.csv", b"c,d")])
    assert [f["filename"] for f in up["files"]] == ["数据.csv", "报告.csv"]
    body = _run(client, up)
    assert json.loads(body["stdout"]) == {"报告.csv": "c,d", "数据.csv": "a,b"}


def test_colliding_names_are_made_unique_and_noted(client) -> None:
    up = _upload(client, [("same.txt", b"first"), ("same.txt", b"second")])
    body = _run(client, up)
    assert json.loads(body["stdout"]) == {"same.txt": "first", "same-2.txt": "second"}
    assert "same.txt" in body["stderr"] and "/mnt/data/same-2.txt" in body["stderr"]


def test_long_names_keep_their_extension(client) -> None:
    name = "数" * 100 + ".csv"  # 304 bytes
    up = _upload(client, [(name, b"x")])
    stored = up["files"][0]["filename"]
    assert stored.endswith(".csv") and len(stored.encode()) <= 255
    assert json.loads(_run(client, up)["stdout"]) == {stored: "x"}


def test_a_missing_input_is_reported(client) -> None:
    up = _upload(client, [("here.txt", b"h")])
    missing = {"id": "A" * 21, "session_id": "B" * 21, "name": "gone.csv"}
    body = _run(client, up, [missing])
    assert json.loads(body["stdout"]) == {"here.txt": "h"}
    assert "gone.csv" in body["stderr"] and "not loaded" in body["stderr"]
