"""The contract cases (api-contract.md §9) as plain async checks against any server.

Each check takes a ``Kit`` (an HTTP client with no credentials, the target's key, options) and
returns normally (pass), raises ``Fail`` with what differed, or raises ``Skip`` when the check cannot
run here (e.g. no Node). Checks accept both KubeCodeRun's behaviour and kcr-trio's documented,
compatible deviations (``bash`` runs; ``storage_session_id`` accepted), so the table compares
servers on what LibreChat relies on, not on cosmetics.

The checks create sessions and files on the target (entity ``kcr-bench-conformance``); case 4 runs a
program until the target's ``MAX_EXECUTION_TIME`` stops it, and case 24 runs an 8 s program (both
bounded by ``--check-timeout``).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from kcr_trio.bench.model import Options
from kcr_trio.bench.node import classify, node_problem, run_sequence
from kcr_trio.bench.targets import Target

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{19}[A-Za-z0-9]$")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
READ = "print(open('/mnt/data/{name}').read(), end='')"
ENTITY = "kcr-bench-conformance"


class Fail(Exception):
    """The target answered differently from the contract."""


class Skip(Exception):
    """The check cannot run here."""


def expect(cond: Any, message: str) -> None:
    if not cond:
        raise Fail(message)


def short(r: httpx.Response) -> str:
    return f"HTTP {r.status_code} {r.text[:160]!r}"


@dataclass
class Kit:
    http: httpx.AsyncClient  # no credentials: each check decides what to send
    target: Target
    opts: Options

    @property
    def key(self) -> str:
        return self.target.key or ""

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    async def exec(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/exec", json=body, headers=self.auth if headers is None else headers)

    async def exec_ok(self, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.exec(body)
        expect(r.status_code == 200, short(r))
        answer: dict[str, Any] = r.json()
        return answer

    async def upload(self, name: str, data: bytes, entity_id: str | None = ENTITY) -> dict[str, Any]:
        form = {"entity_id": entity_id} if entity_id else {}
        r = await self.http.post("/upload", files={"file": (name, data, "text/csv")}, data=form, headers=self.auth)
        expect(r.status_code == 200, f"upload: {short(r)}")
        answer: dict[str, Any] = r.json()
        return answer

    async def upload_ref(self, name: str, data: bytes) -> tuple[str, str, str]:
        body = await self.upload(name, data, entity_id=None)
        return body["session_id"], body["files"][0]["fileId"], body["files"][0]["filename"]


def stdout(body: dict[str, Any]) -> str:
    return str(body.get("stdout", ""))


def same_text(a: str, b: str) -> bool:
    """KubeCodeRun strips output; compare without surrounding whitespace."""
    return a.strip() == b.strip()


# -- 1-8: /exec -----------------------------------------------------------------------------------


async def c01(k: Kit) -> None:
    b = await k.exec_ok({"code": "print('hi')", "lang": "py"})
    expect(ID.match(str(b.get("session_id"))), f"session_id {b.get('session_id')!r} is not a 21-char id")
    expect(b.get("files") == [] and same_text(stdout(b), "hi") and b.get("stderr") == "", f"body {b}")
    expect(isinstance(b.get("has_state"), bool) and {"state_size", "state_hash"} <= b.keys(), "state fields missing")


async def c02(k: Kit) -> None:
    b = await k.exec_ok({"code": "print('hi')", "lang": "py", "user_id": "u1", "args": ["a"],
                         "LIBRECHAT_CODE_API_KEY": k.key, "foo": 1})
    expect(same_text(stdout(b), "hi"), f"stdout {stdout(b)!r}")


async def c03(k: Kit) -> None:
    b = await k.exec_ok({"code": "raise ValueError('x')", "lang": "py"})
    expect("ValueError" in str(b.get("stderr")) and stdout(b) == "", f"body {b}")


async def c04(k: Kit) -> None:
    b = await k.exec_ok({"code": "import time; time.sleep(999)", "lang": "py"})
    expect("timed out" in str(b.get("stderr")).lower(), f"stderr {b.get('stderr')!r}")


async def c05(k: Kit) -> None:
    r = await k.exec({"code": "echo hi", "lang": "bash"})
    if r.status_code == 400:
        expect(r.json().get("error") == "Unsupported programming language: bash", short(r))
    else:  # documented deviation: bash runs
        expect(r.status_code == 200 and same_text(stdout(r.json()), "hi"), short(r))
    r = await k.exec({"code": "x", "lang": "cobol"})
    expect(r.status_code == 400, short(r))
    body = r.json()
    expect(body.get("error") == "Unsupported programming language: cobol", short(r))
    expect(body.get("details", [{}])[0].get("code") == "unsupported_language", short(r))


async def c06(k: Kit) -> None:
    b = await k.exec_ok({"code": "console.log(1)", "lang": "JS"})
    expect(same_text(stdout(b), "1"), f"stdout {stdout(b)!r}")


async def c07(k: Kit) -> None:
    r = await k.exec({"code": "   ", "lang": "py"})
    expect(r.status_code == 400 and r.json().get("details", [{}])[0].get("code") == "empty_code", short(r))
    r = await k.exec({"lang": "py"})
    expect(r.status_code == 422 and r.json().get("error") == "Request validation failed", short(r))
    expect(r.json().get("details", [{}])[0].get("field") == "body -> code", short(r))


async def c08(k: Kit) -> None:
    r = await k.exec({"code": "print(1)", "lang": "py", "files": [{"id": "x", "name": "a"}]})
    expect(r.status_code == 422, f"file ref without session_id: {short(r)}")
    r = await k.exec({"code": "print(1)", "lang": "py", "files": [{"id": "x", "storage_session_id": "y", "name": "a"}]})
    expect(r.status_code in (200, 422), f"storage_session_id alias: {short(r)}")  # 200 with the §8 alias


# -- 9-12: upload and listings --------------------------------------------------------------------


async def c09(k: Kit) -> None:
    b = await k.upload("my data.csv", b"a,b\n1,2\n")
    expect(b.get("message") == "success" and ID.match(str(b.get("session_id"))), f"body {b}")
    f = (b.get("files") or [{}])[0]
    expect(f.get("filename") == "my_data.csv" and ID.match(str(f.get("fileId"))), f"files {b.get('files')}")
    r = await k.http.post("/upload", data={"entity_id": ENTITY}, files={"other": ("x", b"1")}, headers=k.auth)
    expect(r.status_code == 422, f"no file part: {short(r)}")
    if k.opts.conformance_max_file_mb:
        big = b"0" * (k.opts.conformance_max_file_mb * 1024 * 1024 + 1)
        r = await k.http.post("/upload", files={"file": ("big.bin", big)}, headers=k.auth)
        expect(r.status_code == 413, f"oversize ({k.opts.conformance_max_file_mb} MB + 1 B): {short(r)}")


async def c10(k: Kit) -> None:
    b = await k.upload("s.csv", b"1")
    sid, fid = b["session_id"], b["files"][0]["fileId"]
    r = await k.http.get(f"/files/{sid}", params={"detail": "summary", "entity_id": ENTITY}, headers=k.auth)
    expect(r.status_code == 200, short(r))
    entry = next((e for e in r.json() if e.get("name") == f"{sid}/{fid}"), None)
    expect(entry is not None, f"{sid}/{fid} not in {r.text[:200]}")
    assert entry is not None  # expect() raised otherwise
    stamp = dt.datetime.fromisoformat(str(entry["lastModified"]).replace("Z", "+00:00"))
    expect(dt.datetime.now(dt.UTC) - stamp < dt.timedelta(hours=23), f"stale lastModified {stamp}")


async def c11(k: Kit) -> None:
    r = await k.http.get("/files/NOPE", params={"detail": "summary"}, headers=k.auth)
    expect(r.status_code == 200 and r.json() == [], short(r))


async def c12(k: Kit) -> None:
    b = await k.upload("full.csv", b"12345")
    sid, fid = b["session_id"], b["files"][0]["fileId"]
    r = await k.http.get(f"/files/{sid}", params={"detail": "full"}, headers=k.auth)
    expect(r.status_code == 200, short(r))
    item = next((i for i in r.json() if i.get("id") == fid), None)
    expect(item is not None, f"{fid} not in listing")
    assert item is not None  # expect() raised otherwise
    need = {"name", "id", "session_id", "content", "size", "lastModified", "etag", "metadata", "contentType"}
    expect(need <= item.keys(), f"missing {need - item.keys()}")
    expect(item["content"] is None and item["size"] == 5 and item["etag"] == f'"{fid}"', f"item {item}")


# -- 13-18: mounting, outputs, downloads -----------------------------------------------------------


async def c13(k: Kit) -> None:
    sid, fid, name = await k.upload_ref("my data.csv", b"a,b\n1,2\n")
    b = await k.exec_ok({"code": READ.format(name=name), "lang": "py", "files": [{"id": fid, "session_id": sid, "name": name}]})
    expect(same_text(stdout(b), "a,b\n1,2"), f"stdout {stdout(b)!r}")
    expect(b.get("session_id") == sid, f"session_id {b.get('session_id')} != {sid}")


async def c14(k: Kit) -> None:
    sid, _, name = await k.upload_ref("named.csv", b"by-name")
    b = await k.exec_ok({"code": READ.format(name=name), "lang": "py", "files": [{"id": "", "session_id": sid, "name": name}]})
    expect(same_text(stdout(b), "by-name"), f"stdout {stdout(b)!r} stderr {b.get('stderr')!r}")


async def c15(k: Kit) -> None:
    b = await k.exec_ok({"code": "import os; print(os.path.exists('/mnt/data/x.csv'))", "lang": "py",
                         "files": [{"id": "nope", "session_id": "nope", "name": "x.csv"}]})
    expect(same_text(stdout(b), "False"), f"stdout {stdout(b)!r}")


async def c16(k: Kit) -> None:
    b = await k.exec_ok({"code": f"open('/mnt/data/out.png','wb').write({PNG!r})", "lang": "py"})
    files = b.get("files") or []
    expect([f.get("name") for f in files] == ["out.png"], f"files {files}")
    r = await k.http.get(f"/download/{b['session_id']}/{files[0]['id']}", headers=k.auth)
    expect(r.status_code == 200 and r.content == PNG, f"download: HTTP {r.status_code}, {len(r.content)} bytes")
    expect(r.headers.get("content-type", "").startswith("image/png"), f"content-type {r.headers.get('content-type')}")
    cd = r.headers.get("content-disposition", "")
    expect("filename=" in cd and "filename*=" in cd, f"content-disposition {cd!r}")


async def c17(k: Kit) -> None:
    sid, fid, name = await k.upload_ref("in.csv", b"x")
    b = await k.exec_ok({"code": READ.format(name=name), "lang": "py", "files": [{"id": fid, "session_id": sid, "name": name}]})
    expect(b.get("files") == [], f"input echoed: {b.get('files')}")


async def c18(k: Kit) -> None:
    sid, _, _ = await k.upload_ref("d.csv", b"x")
    r = await k.http.get(f"/download/{sid}/NOPE", headers=k.auth)
    expect(r.status_code == 404 and r.json().get("error") == "File not found", short(r))


# -- 19-24: auth, open endpoints, content type, delete, keep-alive ----------------------------------


async def c19(k: Kit) -> None:
    body = {"code": "print(1)", "lang": "py"}
    r = await k.exec(body, headers={})
    expect(r.status_code == 401 and {"error", "timestamp"} <= set(r.json()), f"no key: {short(r)}")
    r = await k.exec(body, headers={"X-API-Key": "wrong-key-for-bench"})
    expect(r.status_code == 401, f"wrong key: {short(r)}")
    for scheme in ("Bearer", "ApiKey"):
        r = await k.exec(body, headers={"Authorization": f"{scheme} {k.key}"})
        expect(r.status_code == 200, f"Authorization: {scheme}: {short(r)}")


async def c20(k: Kit) -> None:
    for field in ("LIBRECHAT_CODE_API_KEY", "api_key", "apiKey"):
        r = await k.exec({"code": "print(1)", "lang": "py", field: k.key}, headers={})
        expect(r.status_code == 200, f"{field} in body: {short(r)}")
    r = await k.exec({"code": "print(1)", "lang": "py", "LIBRECHAT_CODE_API_KEY": k.key},
                     headers={"X-API-Key": "wrong-key-for-bench"})
    expect(r.status_code == 401, f"body key valid, header key wrong: {short(r)}")


async def c21(k: Kit) -> None:
    r = await k.http.get("/health")
    expect(r.status_code == 200 and r.json().get("status") == "healthy", f"/health: {short(r)}")
    r = await k.http.get("/ready")
    expect(r.status_code == 200 and r.json().get("status") == "ready", f"/ready: {short(r)}")
    r = await k.http.options("/download/a/b")
    expect(r.status_code == 204, f"OPTIONS: {short(r)}")


async def c22(k: Kit) -> None:
    r = await k.http.post("/exec", content=b"<x/>", headers={"Content-Type": "application/xml"})
    expect(r.status_code == 415, short(r))


async def c23(k: Kit) -> None:
    sid, fid, _ = await k.upload_ref("del.csv", b"x")
    r = await k.http.delete(f"/files/{sid}/{fid}", headers=k.auth)
    expect(r.status_code == 200 and r.content == b"", f"delete: {short(r)}")
    r = await k.http.delete(f"/files/{sid}/{fid}", headers=k.auth)
    expect(r.status_code == 404, f"second delete: {short(r)}")


async def c24(k: Kit) -> None:
    problem = node_problem(k.opts.node_dir)
    if problem:
        raise Skip(problem)
    secs = k.opts.keepalive_seconds
    results: dict[str, dict[str, Any]] = {}

    async def slow() -> None:
        results["slow"] = await run_sequence(k.target, f"import time; time.sleep({secs}); print('slept')",
                                             node_dir=k.opts.node_dir, timeout=secs + 30)

    async def idle() -> None:
        results["idle"] = await run_sequence(k.target, "print('again')", node_dir=k.opts.node_dir,
                                             idle_ms=5500, timeout=40)

    async with trio.open_nursery() as n:
        n.start_soon(slow)
        n.start_soon(idle)
    expect(classify(results["slow"], "slept") == "ok", f"{secs:g} s exec after axios GET: {results['slow'].get('error')}")
    expect(classify(results["idle"], "again") == "ok", f"reuse after 5.5 s idle: {results['idle'].get('error')}")


CHECKS: list[tuple[str, str, Callable[[Kit], Awaitable[None]]]] = [
    ("01", "minimal exec", c01), ("02", "LibreChat extras ignored", c02), ("03", "runtime error is 200", c03),
    ("04", "timeout is 200", c04), ("05", "unsupported language 400 (bash may run)", c05),
    ("06", "case-insensitive lang", c06), ("07", "empty/missing code", c07), ("08", "bad files item 422", c08),
    ("09", "upload (LibreChat form), 422, 413", c09), ("10", "summary listing fresh", c10),
    ("11", "unknown session lists []", c11), ("12", "full listing shape", c12), ("13", "mount by ref", c13),
    ("14", "mount by name fallback", c14), ("15", "missing ref tolerated", c15),
    ("16", "generated file downloadable", c16), ("17", "inputs not echoed", c17), ("18", "download 404", c18),
    ("19", "auth headers", c19), ("20", "body key", c20), ("21", "open endpoints", c21),
    ("22", "content type 415 before auth", c22), ("23", "delete, then 404", c23),
    ("24", "keep-alive robustness (Node)", c24),
]


async def run_checks(target: Target, opts: Options, on_done: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every check not in ``opts.conformance_skip``; one row per case."""
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=target.url, timeout=httpx.Timeout(opts.check_timeout, connect=10),
                                 headers={"User-Agent": "kcr-trio-bench"}) as http:
        kit = Kit(http, target, opts)
        for case, title, fn in CHECKS:
            start = time.perf_counter()
            status, detail = "pass", ""
            if case in opts.conformance_skip:
                status, detail = "skip", "skipped by --skip-case"
            else:
                try:
                    with trio.fail_after(opts.check_timeout):
                        await fn(kit)
                except Fail as exc:
                    status, detail = "fail", str(exc)
                except Skip as exc:
                    status, detail = "skip", str(exc)
                except trio.TooSlowError:
                    status, detail = "fail", f"no answer within {opts.check_timeout:g} s"
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                    status, detail = "fail", f"{type(exc).__name__}: {exc}"
            rows.append({"case": case, "title": title, "status": status, "detail": detail[:300],
                         "seconds": round(time.perf_counter() - start, 3)})
            if on_done:
                on_done(case)
    return rows
