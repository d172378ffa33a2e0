"""The contract cases of ``api-contract.md`` §9 and the §8 aliases, over real HTTP.

Each test talks to a real ``kcr-trio serve`` process whose executor runs real code in real sidecar
processes, once with the embedded stores and once with redis-server + an S3 server.
"""

from __future__ import annotations

import datetime as dt
import os
import re

import httpx
import pytest

from kcr_trio.core.ids import ID_RE
from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
def client(contract_server: ServerProcess):
    with httpx.Client(base_url=contract_server.url, timeout=30) as c:
        yield c


def exec_(client: httpx.Client, body: dict, headers: dict | None = None) -> httpx.Response:
    return client.post("/exec", json=body, headers=H if headers is None else headers)


def upload(client: httpx.Client, name: str, data: bytes, entity_id: str | None = "agent_1") -> dict:
    form = {"entity_id": entity_id} if entity_id else {}
    r = client.post("/upload", files={"file": (name, data, "text/csv")}, data=form, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


# -- 1-8: /exec ---------------------------------------------------------------------------------


def test_01_minimal_exec(client) -> None:
    r = exec_(client, {"code": "print('hi')", "lang": "py"})
    assert r.status_code == 200
    body = r.json()
    assert ID_RE.match(body["session_id"])
    assert body["files"] == [] and body["stdout"] == "hi\n" and body["stderr"] == ""
    assert isinstance(body["has_state"], bool) and "state_size" in body and "state_hash" in body


def test_02_librechat_extras_are_ignored(client) -> None:
    r = exec_(client, {"code": "print('hi')", "lang": "py", "user_id": "u1", "args": ["a"],
                       "LIBRECHAT_CODE_API_KEY": TEST_KEY, "foo": 1})
    assert r.status_code == 200 and r.json()["stdout"] == "hi\n"


def test_03_runtime_error_is_200(client) -> None:
    body = exec_(client, {"code": "raise ValueError('x')", "lang": "py"}).json()
    assert "ValueError" in body["stderr"] and body["stdout"] == ""


def test_04_timeout_is_200(client) -> None:
    r = exec_(client, {"code": "import time; time.sleep(999)", "lang": "py"})
    assert r.status_code == 200
    assert "timed out" in r.json()["stderr"]


def test_05_bash_runs_and_unknown_language_is_400(client) -> None:
    assert exec_(client, {"code": "echo hi", "lang": "bash"}).json()["stdout"] == "hi\n"
    r = exec_(client, {"code": "x", "lang": "cobol"})
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "Unsupported programming language: cobol"
    assert body["details"][0]["code"] == "unsupported_language" and body["error_type"] == "validation"


def test_06_language_is_case_insensitive(client) -> None:
    assert exec_(client, {"code": "console.log(1)", "lang": "JS"}).json()["stdout"] == "1\n"


def test_07_empty_and_missing_code(client) -> None:
    r = exec_(client, {"code": "   ", "lang": "py"})
    assert r.status_code == 400 and r.json()["details"][0]["code"] == "empty_code"
    r = exec_(client, {"lang": "py"})
    assert r.status_code == 422
    assert r.json()["error"] == "Request validation failed"
    assert r.json()["details"][0]["field"] == "body -> code"


def test_08_bad_file_ref_and_storage_session_alias(client) -> None:
    r = exec_(client, {"code": "print(1)", "lang": "py", "files": [{"id": "x", "name": "a"}]})
    assert r.status_code == 422
    r = exec_(client, {"code": "print(1)", "lang": "py",
                       "files": [{"id": "x", "storage_session_id": "y", "name": "a", "kind": "user", "resource_id": "r"}]})
    assert r.status_code == 200
    assert exec_(client, {"code": "print(1)", "lang": "py", "files": None}).status_code == 422


# -- 9-12: upload and listings -----------------------------------------------------------------


def test_09_upload(client) -> None:
    body = upload(client, "my data.csv", b"a,b\n1,2\n")
    assert body["message"] == "success" and ID_RE.match(body["session_id"])
    assert body["storage_session_id"] == body["session_id"]
    assert body["files"][0]["filename"] == "my_data.csv" and ID_RE.match(body["files"][0]["fileId"])
    r = client.post("/upload", data={"entity_id": "agent_1"}, files={"other": ("x", b"1")}, headers=H)
    assert r.status_code == 422
    r = client.post("/upload", files={"file": ("big.bin", os.urandom(1024 * 1024 + 1))}, headers=H)
    assert r.status_code == 413 and "exceeds maximum size of 1MB" in r.json()["error"]


def test_10_summary_listing_is_fresh(client) -> None:
    up = upload(client, "s.csv", b"1")
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    r = client.get(f"/files/{sid}", params={"detail": "summary", "entity_id": "agent_1"}, headers=H)
    assert r.status_code == 200
    entry = next(e for e in r.json() if e["name"] == f"{sid}/{fid}")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["lastModified"])
    stamp = dt.datetime.fromisoformat(entry["lastModified"].replace("Z", "+00:00"))
    assert dt.datetime.now(dt.UTC) - stamp < dt.timedelta(hours=23)


def test_11_unknown_session_lists_empty(client) -> None:
    for detail in ("summary", "simple", "full"):
        r = client.get("/files/NOPE", params={"detail": detail}, headers=H)
        assert r.status_code == 200 and r.json() == []


def test_12_full_listing(client) -> None:
    up = upload(client, "full.csv", b"12345")
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    items = client.get(f"/files/{sid}", params={"detail": "full"}, headers=H).json()
    item = next(i for i in items if i["id"] == fid)
    assert item["name"] == "full.csv" and item["session_id"] == sid and item["content"] is None
    assert item["size"] == 5 and item["etag"] == f'"{fid}"' and item["contentType"] == "text/csv"
    assert item["metadata"] == {"content-type": "text/csv", "original-filename": "full.csv"}
    assert dt.datetime.fromisoformat(item["lastModified"]).tzinfo is not None
    simple = client.get(f"/files/{sid}", params={"detail": "simple"}, headers=H).json()
    assert {"id": fid, "name": "full.csv", "path": "/full.csv"} in simple


# -- 13-18: mounting, outputs, downloads ---------------------------------------------------------


READ = "print(open('/mnt/data/{name}').read(), end='')"


def test_13_mount_by_ref(client) -> None:
    up = upload(client, "my data.csv", b"a,b\n1,2\n", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    body = exec_(client, {"code": READ.format(name="my_data.csv"), "lang": "py",
                          "files": [{"id": fid, "session_id": sid, "name": "my_data.csv"}]}).json()
    assert body["stdout"] == "a,b\n1,2\n" and body["session_id"] == sid


def test_14_mount_by_name_fallback(client) -> None:
    up = upload(client, "named.csv", b"by-name", entity_id=None)
    sid = up["session_id"]
    body = exec_(client, {"code": READ.format(name="named.csv"), "lang": "py",
                          "files": [{"id": "", "session_id": sid, "name": "named.csv"}]}).json()
    assert body["stdout"] == "by-name\n"


def test_15_missing_ref_is_tolerated(client) -> None:
    code = "import os; print(os.path.exists('/mnt/data/x.csv'))"
    r = exec_(client, {"code": code, "lang": "py", "files": [{"id": "nope", "session_id": "nope", "name": "x.csv"}]})
    assert r.status_code == 200 and r.json()["stdout"] == "False\n"


def test_16_generated_file_is_reported_and_downloadable(client) -> None:
    code = f"open('/mnt/data/out.png','wb').write({PNG!r})"
    body = exec_(client, {"code": code, "lang": "py"}).json()
    assert [(f["name"], f["path"]) for f in body["files"]] == [("out.png", None)]
    gid = body["files"][0]["id"]
    r = client.get(f"/download/{body['session_id']}/{gid}", params={"kind": "user", "id": "u1"}, headers=H)
    assert r.status_code == 200 and r.content == PNG
    assert r.headers["content-type"] == "image/png"
    assert 'filename="out.png"' in r.headers["content-disposition"]
    assert "filename*=UTF-8''out.png" in r.headers["content-disposition"]


def test_17_inputs_only_read_are_not_echoed(client) -> None:
    up = upload(client, "in.csv", b"x", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    body = exec_(client, {"code": READ.format(name="in.csv"), "lang": "py",
                          "files": [{"id": fid, "session_id": sid, "name": "in.csv"}]}).json()
    assert body["files"] == []


def test_18_download_404(client) -> None:
    up = upload(client, "d.csv", b"x", entity_id=None)
    r = client.get(f"/download/{up['session_id']}/NOPE", headers=H)
    assert r.status_code == 404 and r.json()["error"] == "File not found"
    assert client.get("/download/..%2F..%2Fetc/passwd", headers=H).status_code == 404


# -- 19-23: auth, open endpoints, content type, delete ------------------------------------------


def test_19_auth_headers(client) -> None:
    r = exec_(client, {"code": "print(1)", "lang": "py"}, headers={})
    assert r.status_code == 401 and set(r.json()) == {"error", "timestamp"}
    assert exec_(client, {"code": "print(1)", "lang": "py"}, headers={"X-API-Key": "wrong-key"}).status_code == 401
    assert exec_(client, {"code": "print(1)", "lang": "py"}, headers={"Authorization": f"Bearer {TEST_KEY}"}).status_code == 200
    assert exec_(client, {"code": "print(1)", "lang": "py"}, headers={"Authorization": f"ApiKey {TEST_KEY}"}).status_code == 200
    assert client.get("/files/abc", headers={"Authorization": "Basic abc"}).status_code == 401


@pytest.mark.parametrize("field", ["LIBRECHAT_CODE_API_KEY", "api_key", "apiKey"])
def test_20_body_key(client, field: str) -> None:
    assert exec_(client, {"code": "print(1)", "lang": "py", field: TEST_KEY}, headers={}).status_code == 200
    assert exec_(client, {"code": "print(1)", "lang": "py", field: TEST_KEY},
                 headers={"X-API-Key": "wrong-key"}).status_code == 401


def test_21_open_endpoints(client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "healthy"
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    r = client.options("/download/a/b")
    # 204 without auth as in KubeCodeRun, but CORS is off by default (KCR_CORS_ORIGINS; audit finding 12).
    assert r.status_code == 204 and "access-control-allow-origin" not in r.headers


def test_22_content_type_checked_before_auth(client) -> None:
    r = client.post("/exec", content=b"<x/>", headers={"Content-Type": "application/xml"})
    assert r.status_code == 415 and r.json()["error"] == "Unsupported content type: application/xml"


def test_23_delete(client) -> None:
    up = upload(client, "del.csv", b"x", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    r = client.delete(f"/files/{sid}/{fid}", headers=H)
    assert r.status_code == 200 and r.content == b""
    assert client.delete(f"/files/{sid}/{fid}", headers=H).status_code == 404
    assert client.get(f"/download/{sid}/{fid}", headers=H).status_code == 404


# -- §8: the newer LibreChat contract -----------------------------------------------------------


def test_freshness_route(client) -> None:
    up = upload(client, "fresh.csv", b"x", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    r = client.get(f"/sessions/{sid}/objects/{fid}", params={"kind": "user", "id": "u1"},
                   headers={**H, "User-Agent": "LibreChat/1.0"})  # LibreChat's axios call: closed after
    assert r.status_code == 200 and r.headers["connection"] == "close"
    stamp = dt.datetime.fromisoformat(r.json()["lastModified"].replace("Z", "+00:00"))
    assert dt.datetime.now(dt.UTC) - stamp < dt.timedelta(minutes=5)
    assert client.get(f"/sessions/{sid}/objects/NOPE", headers=H).status_code == 404


def test_batch_upload_reports_per_file(client) -> None:
    files = [("file", ("a.csv", b"1")), ("file", ("b c.csv", b"2")), ("file", ("huge.bin", os.urandom(1024 * 1024 + 10)))]
    r = client.post("/upload/batch", files=files, data={"entity_id": "agent_b"}, headers=H)
    assert r.status_code == 200
    body = r.json()
    assert body["succeeded"] == 2 and body["failed"] == 1
    assert {f["filename"] for f in body["files"] if f["status"] == "success"} == {"a.csv", "b_c.csv"}
    assert [f["filename"] for f in body["files"] if f["status"] == "error"] == ["huge.bin"]


def test_uploads_stay_mounted_after_generated_files(client) -> None:
    """KubeCodeRun's "uploads vanish" pattern: the second call lists only the generated file."""
    up = upload(client, "keep.csv", b"kept", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    first = exec_(client, {"code": "open('/mnt/data/gen.txt','w').write('g')", "lang": "py",
                           "files": [{"id": fid, "session_id": sid, "name": "keep.csv"}]}).json()
    gen = first["files"][0]
    second = exec_(client, {"code": READ.format(name="keep.csv"), "lang": "py",
                            "files": [{"id": gen["id"], "session_id": first["session_id"], "name": gen["name"]}]}).json()
    assert second["stdout"] == "kept\n"


def test_modified_input_is_returned_as_new_output(client) -> None:
    up = upload(client, "edit.csv", b"old", entity_id=None)
    sid, fid = up["session_id"], up["files"][0]["fileId"]
    body = exec_(client, {"code": "open('/mnt/data/edit.csv','w').write('new')", "lang": "py",
                          "files": [{"id": fid, "session_id": sid, "name": "edit.csv"}]}).json()
    assert [f["name"] for f in body["files"]] == ["edit.csv"]
    r = client.get(f"/download/{sid}/{body['files'][0]['id']}", headers=H)
    assert r.content == b"new"
