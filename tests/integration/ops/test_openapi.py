"""The OpenAPI document stays in sync with the app: every route documented, real responses valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from kcr_trio import __version__
from kcr_trio.api.app_factory import create_app
from kcr_trio.api.openapi import openapi_document, openapi_path
from kcr_trio.app import open_services
from kcr_trio.backends.memory_executor import MemoryExecutor
from tests.support.ops import H, Program, ops_server
from tests.support.server import TEST_KEY, make_settings

pytestmark = pytest.mark.integration


def routes_of(app: Any) -> set[tuple[str, str]]:
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = set(rule.methods or ()) - {"HEAD"}
        if rule.provide_automatic_options:
            methods.discard("OPTIONS")
        found |= {(m.lower(), openapi_path(rule.rule)) for m in methods}
    return found


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, ops in doc["paths"].items() for method in ops}


async def test_every_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    for enable_docs in (True, False):
        settings = make_settings(tmp_path, enable_docs=enable_docs)
        async with open_services(settings, executor=MemoryExecutor(Program())) as svc:
            app = create_app(svc)
            doc = openapi_document(app, __version__)
        assert routes_of(app) == documented(doc)
        undocumented = [(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if op.get("x-undocumented")]
        assert undocumented == []
        assert ("post", "/exec") in documented(doc) and ("get", "/files/{session_id}") in documented(doc)
        assert (("get", "/openapi.json") in documented(doc)) is enable_docs
        Draft202012Validator.check_schema(doc["components"]["schemas"]["ExecBody"])


class Validator:
    """Validates a response against the document's schema for its operation and status."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry = Registry().with_resource("urn:kcr-openapi", DRAFT202012.create_resource(doc))
        self.checked: list[tuple[str, str, int]] = []

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        operation = self.doc["paths"][path][method]
        spec = operation["responses"].get(str(response.status_code))
        assert spec is not None, f"{method} {path}: status {response.status_code} not documented"
        content = spec.get("content")
        if content and "application/json" in content:
            assert response.headers["content-type"].startswith("application/json")
            schema = json.loads(json.dumps(content["application/json"]["schema"]).replace('"#/', '"urn:kcr-openapi#/'))
            Draft202012Validator(schema, registry=self.registry).validate(json.loads(response.content))
        elif content and "text/plain" in content:
            assert response.headers["content-type"].startswith("text/plain")
        self.checked.append((method, path, response.status_code))


async def test_real_responses_match_the_schemas(tmp_path: Path) -> None:
    async with ops_server(tmp_path, max_file_size_mb=1, kcr_heartbeat_grace=0.2) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            doc = (await client.get(url + "/openapi.json")).json()
            v = Validator(doc)
            r = await client.post(url + "/upload", headers=H, data={"entity_id": "agent_1"},
                                  files={"file": ("data.csv", b"a,b\n1,2\n", "text/csv")})
            v.check("post", "/upload", r)
            sid, fid = r.json()["session_id"], r.json()["files"][0]["fileId"]
            ref = {"id": fid, "session_id": sid, "name": "data.csv"}
            v.check("post", "/exec", await client.post(url + "/exec", headers=H,
                                                       json={"code": "write:x", "lang": "py", "files": [ref]}))
            # A heartbeat-streamed answer is the same document after the spaces.
            r = await client.post(url + "/exec", headers=H, json={"code": "sleep:0.5", "lang": "py"})
            assert r.content.startswith(b" ")
            v.check("post", "/exec", r)
            for code, lang in (("x", "cobol"), ("   ", "py")):
                v.check("post", "/exec", await client.post(url + "/exec", headers=H, json={"code": code, "lang": lang}))
            v.check("post", "/exec", await client.post(url + "/exec", headers=H, json={"lang": "py"}))
            v.check("post", "/exec", await client.post(url + "/exec", json={"code": "x", "lang": "py"}))
            v.check("post", "/exec", await client.post(url + "/exec", headers={**H, "Content-Type": "text/xml"},
                                                       content=b"<x/>"))
            batch = {"files": ("big.bin", b"\0" * (1024 * 1024 + 1))}
            v.check("post", "/upload/batch", await client.post(url + "/upload/batch", headers=H, files=batch))
            for detail in ("summary", "simple", "full"):
                v.check("get", "/files/{session_id}",
                        await client.get(f"{url}/files/{sid}", headers=H, params={"detail": detail}))
            v.check("get", "/sessions/{session_id}/objects/{file_id}",
                    await client.get(f"{url}/sessions/{sid}/objects/{fid}", headers=H))
            v.check("get", "/sessions/{session_id}/objects/{file_id}",
                    await client.get(f"{url}/sessions/{sid}/objects/nope", headers=H))
            v.check("get", "/download/{session_id}/{file_id}", await client.get(f"{url}/download/{sid}/{fid}", headers=H))
            v.check("options", "/download/{session_id}/{file_id}", await client.options(f"{url}/download/{sid}/{fid}"))
            v.check("delete", "/files/{session_id}/{file_id}", await client.delete(f"{url}/files/{sid}/{fid}", headers=H))
            v.check("delete", "/files/{session_id}/{file_id}", await client.delete(f"{url}/files/{sid}/{fid}", headers=H))
            v.check("get", "/health", await client.get(url + "/health"))
            v.check("get", "/ready", await client.get(url + "/ready"))
            v.check("get", "/metrics", await client.get(url + "/metrics", headers={"Authorization": f"Bearer {TEST_KEY}"}))
            v.check("get", "/metrics", await client.get(url + "/metrics"))
            r = await client.get(url + "/docs")
            v.check("get", "/docs", r)
            assert r.headers["content-type"].startswith("text/html") and "/openapi.json" in r.text
    statuses = {status for _, _, status in v.checked}
    assert {200, 204, 400, 401, 404, 415, 422} <= statuses


async def test_docs_can_be_turned_off(tmp_path: Path) -> None:
    async with ops_server(tmp_path, enable_docs=False) as (url, _, _):
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(url + "/openapi.json")).status_code == 404
            assert (await client.get(url + "/docs")).status_code == 404
