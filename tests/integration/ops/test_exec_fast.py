"""``POST /exec`` is answered below Quart (``api/exec_fast.py``): every answer must be the one the
Quart route gives, byte for byte. One in-process server on a real loopback socket (the in-process
executor twin: these tests are about the HTTP edge); each request is sent twice on raw sockets, with
the fast path on and switched off (``exec_fast.is_exec`` is looked up per request), and the two
answers are compared: status line, every header in order, body, access line. Only what differs
between any two requests is masked (request ids, dates, timestamps, generated ids)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from kcr_trio.api import exec_fast
from tests.support.ops import LogCapture, Program, ops_server, port_of, raw
from tests.support.server import TEST_KEY, await_until

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key-0123456789abcdef"
JSON = "Content-Type: application/json\r\n"
_MASKS = [
    (rb"x-request-id: [^\r]+", b"x-request-id: <id>"),
    (rb"date: [^\r]+", b"date: <date>"),
    (rb"x-ratelimit-reset: \d+", b"x-ratelimit-reset: <n>"),
    (rb"retry-after: \d+", b"retry-after: <n>"),
    (rb'"(request_id|session_id)":"[^"]*"', rb'"\1":"<id>"'),
    (rb'"timestamp":[0-9.e+-]+', b'"timestamp":<t>'),
    (rb'"retry_after_seconds":\d+', b'"retry_after_seconds":<n>'),
    (rb'"runtime_status":"\w+"', b'"runtime_status":<new or reused>'),  # the second of a pair reuses
]


EARLY = {"wrong header key", "body key on text/plain is not read", "body type", "no body type", "profile mismatch", "unknown profile",
         "unauthenticated body too large"}


def masked(answer: bytes) -> bytes:
    """The answer with volatile values masked; ``content-length`` is checked, then masked (bodies
    holding a timestamp vary in length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if (length := re.search(rb"content-length: (\d+)", head)) is not None:
        assert int(length.group(1)) == len(body), answer
        head = head.replace(length.group(0), b"content-length: <n>")
    out = head + b"\r\n\r\n" + body
    for pattern, replacement in _MASKS:
        out = re.sub(pattern, replacement, out)
    return out


async def ask(port: int, body: bytes, headers: str = JSON, *, key: str | None = TEST_KEY) -> bytes:
    """One ``POST /exec`` on a fresh kept-alive connection; the whole answer: by its
    ``Content-Length``, or up to the last chunk, or until the server closes."""
    head = f"POST /exec HTTP/1.1\r\nHost: t\r\n{headers}"
    if key is not None:
        head += f"X-API-Key: {key}\r\n"
    stream = await raw(port, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = b""
    try:
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                answer += chunk
                top, sep, rest = answer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", top)
                if sep and (len(rest) >= int(length.group(1)) if length else rest.endswith(b"\r\n0\r\n\r\n")):
                    break
        return answer
    finally:
        await stream.aclose()


@contextmanager
def quart_route(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(exec_fast, "is_exec", lambda method, path: False)
        yield


async def both(port: int, monkeypatch: pytest.MonkeyPatch, body: Any, headers: str = JSON, *,
               key: str | None = TEST_KEY, quart_key: str | None = None, mask: bool = True) -> tuple[bytes, bytes]:
    """The same request through the fast path and through Quart (``quart_key``: another key for
    the Quart request, so that per-key counters give both paths the same sequence)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fast = await ask(port, data, headers, key=key)
    with quart_route(monkeypatch):
        slow = await ask(port, data, headers, key=quart_key if quart_key is not None else key)
    return (masked(fast), masked(slow)) if mask else (fast, slow)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@asynccontextmanager
async def server(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[int, Program]]:
    async with ops_server(tmp_path, **overrides) as (url, program, _):
        yield port_of(url), program


async def test_every_answer_is_the_quart_routes(tmp_path: Path, logs: LogCapture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ok = {"code": "sleep:0", "lang": "py"}
    cases: list[tuple[str, Any, str, str | None, int]] = [
        ("ok", ok, JSON, TEST_KEY, 200),
        ("ok, user id and charset", {**ok, "user_id": "u1"}, "Content-Type: application/json; charset=utf-8\r\n"
         "User-Id: u2\r\n", TEST_KEY, 200),
        ("key in the body", {**ok, "api_key": TEST_KEY}, JSON, None, 200),
        ("wrong key in the body", {**ok, "apiKey": "nope"}, JSON, None, 401),
        ("body key on text/plain is not read", {**ok, "api_key": TEST_KEY}, "Content-Type: text/plain\r\n", None, 401),
        ("wrong header key", ok, JSON, "wrong", 401),
        ("bearer key", ok, JSON + f"Authorization: Bearer {TEST_KEY}\r\n", None, 200),
        ("no key", ok, JSON, None, 401),
        ("body type", ok, "Content-Type: image/png\r\n", TEST_KEY, 415),
        ("no body type", ok, "", TEST_KEY, 415),
        ("field missing", {"lang": "py"}, JSON, TEST_KEY, 422),
        ("bad entity id", {**ok, "entity_id": "a b"}, JSON, TEST_KEY, 422),
        ("bad file ref", {**ok, "files": [{"id": "x"}]}, JSON, TEST_KEY, 422),
        ("bad JSON", b'{"code": "x", "lang":', JSON, TEST_KEY, 422),
        ("not UTF-8", b'{"code": "\xff", "lang": "py"}', JSON, TEST_KEY, 422),
        ("lone surrogate", b'{"code": "\\ud800", "lang": "py"}', JSON, TEST_KEY, 422),
        ("unknown language", {"code": "x", "lang": "cobol"}, JSON, TEST_KEY, 400),
        ("empty code", {"code": "", "lang": "py"}, JSON, TEST_KEY, 400),
        ("bad args", {**ok, "args": [1]}, JSON, TEST_KEY, 400),
        ("bad timeout", {**ok, "timeout": -1}, JSON, TEST_KEY, 400),
        ("too many refs", {**ok, "files": [{"id": f"f{i}", "session_id": "s", "name": "n"} for i in range(4)]},
         JSON, TEST_KEY, 413),
        ("body too large", {**ok, "pad": "x" * 3000}, JSON, TEST_KEY, 413),
        ("unauthenticated body too large", {**ok, "api_key": TEST_KEY, "pad": "x" * 1500}, JSON, None, 413),
        ("profile mismatch", ok, JSON + "X-CodeAPI-Expected-Profile: stateful\r\n", TEST_KEY, 409),
        ("unknown profile", ok, JSON + "X-CodeAPI-Expected-Profile: other\r\n", TEST_KEY, 400),
        ("default profile", ok, JSON + "X-CodeAPI-Expected-Profile: Default\r\n", TEST_KEY, 200),
        ("failed run", {"code": "fail", "lang": "py"}, JSON, TEST_KEY, 503),
        ("non-zero exit", {"code": "import sys; sys.exit(2)", "lang": "py"}, JSON, TEST_KEY, 200),
    ]
    async with server(tmp_path, kcr_max_file_refs=3, kcr_max_json_body_bytes=2048,
                      kcr_unauth_body_bytes=1024, kcr_auth_failures_per_minute=0) as (port, _):
        for name, body, headers, key, status in cases:
            fast, slow = await both(port, monkeypatch, body, headers, key=key)
            if name == "body too large":
                # Whether Quart's 413 closes the connection races its body task (did it take the
                # body's empty last message yet?); the fast path keeps it, as the body is whole.
                assert b"connection: close" not in fast, fast
                slow = slow.replace(b"connection: close\r\n", b"")
            assert fast == slow, (name, fast.decode("latin-1"), slow.decode("latin-1"))
            assert status_of(fast) == status, (name, fast)
    lines = [line for line in logs.access() if line["path"] == "/exec"]
    assert len(lines) == 2 * len(cases)
    keys = ("method", "status", "outcome", "route", "heartbeat")
    for case, fast_line, slow_line in zip(cases, lines[::2], lines[1::2], strict=True):
        assert {k: fast_line.get(k) for k in keys} == {k: slow_line.get(k) for k in keys}, (fast_line, slow_line)
        # The one difference: an answer decided before the body is read (wrong header key, body
        # type, profile, an unauthenticated body announced too large) leaves the body unread on
        # the fast path, where Quart's body task reads what arrived meanwhile.
        if case[0] in EARLY:
            assert fast_line["bytes_in"] == 0, fast_line
        else:
            assert fast_line["bytes_in"] == slow_line["bytes_in"] > 0, (fast_line, slow_line)
        assert set(fast_line.get("phases_ms", {})) == set(slow_line.get("phases_ms", {}))
        if fast_line["status"] == 200:
            assert fast_line["bytes_out"] == slow_line["bytes_out"] and fast_line["route"] == "/exec"


async def test_quota_headers_and_limits_are_the_quart_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = {"code": "sleep:0", "lang": "py"}
    async with server(tmp_path, api_keys=OTHER_KEY, kcr_rate_limit_per_minute=3,
                      kcr_auth_failures_per_minute=2) as (port, _):
        for _ in range(3):  # three per minute per key, each path with its own key
            fast, slow = await both(port, monkeypatch, ok, quart_key=OTHER_KEY)
            assert fast == slow and status_of(fast) == 200 and b"x-ratelimit-limit: 3" in fast, (fast, slow)
        fast, slow = await both(port, monkeypatch, {**ok, "lang": "cobol"}, quart_key=OTHER_KEY)  # counted, then 400
        assert fast == slow and status_of(fast) == 429, (fast, slow)
        fast, slow = await both(port, monkeypatch, ok, key="wrong")  # failure 1 and 2 of the address
        assert fast == slow and status_of(fast) == 401, (fast, slow)
        fast, slow = await both(port, monkeypatch, ok, key="wrong")  # blocked now: 429 with its headers
        assert fast == slow and status_of(fast) == 429 and b"retry-after: <n>" in fast, (fast, slow)


async def test_stateful_profile_answers_as_quart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stateful = JSON + "X-CodeAPI-Expected-Profile: stateful\r\n"
    async with server(tmp_path, kcr_execution_profiles="default,stateful") as (port, _):
        for body, headers, status, profile in (
            ({"code": "sleep:0", "lang": "py"}, stateful, 400, b"stateful"),  # the hint is required
            ({"code": "sleep:0", "lang": "py", "runtime_session_hint": 7}, JSON, 400, b"default"),  # not a string
            ({"code": "sleep:0", "lang": "py", "runtime_session_hint": "ignored"}, JSON, 200, b"default"),
            ({"code": "sleep:0", "lang": "py", "runtime_session_hint": "a:b"}, stateful, 200, b"stateful"),
        ):
            fast, slow = await both(port, monkeypatch, body, headers)
            assert fast == slow and status_of(fast) == status, (fast, slow)
            assert b"x-codeapi-execution-profile: " + profile + b"\r\n" in fast, fast


def committed(answer: bytes) -> tuple[bytes, bytes]:
    """A committed answer's head, and its body with the chunk framing and heartbeats taken out."""
    head, _, body = answer.partition(b"\r\n\r\n")
    payload, rest = b"", body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            assert rest == b"\r\n", answer  # the last chunk, and nothing after it
            break
        payload, rest = payload + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    assert payload.startswith(b" ") and payload.lstrip(b" ").startswith(b"{"), answer
    return masked(head + b"\r\n\r\n").strip(), masked(payload.lstrip(b" "))


async def test_heartbeat_commit_is_the_quart_routes(tmp_path: Path, logs: LogCapture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async with server(tmp_path, kcr_heartbeat_grace=0.2, kcr_heartbeat_interval=0.2, kcr_commit_hold_max=0.0) as (port, _):
        for _ in range(2):
            fast, slow = await both(port, monkeypatch, {"code": "sleep:0.7", "lang": "py"}, mask=False)
            assert committed(fast) == committed(slow), (fast, slow)
            head, payload = committed(fast)
            assert head.startswith(b"HTTP/1.1 200 \r\ncache-control: no-store, no-transform\r\n"), head
            assert b"transfer-encoding: chunked" in head.lower(), head
            assert json.loads(payload)["stdout"] == "done\n", (fast, payload)
    lines = [line for line in logs.access() if line["path"] == "/exec"]
    assert [line.get("heartbeat") for line in lines] == [True] * 4
    assert [line["outcome"] for line in lines] == ["ok"] * 4


async def test_busy_and_client_gone_are_the_quart_routes(tmp_path: Path, logs: LogCapture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy answer is a real 503 on both paths; a client that leaves cancels the run on both."""
    async with server(tmp_path, capacity=1, kcr_acquire_timeout=0.3, kcr_heartbeat_grace=1.0) as (port, program):
        for fast in (True, False):
            with monkeypatch.context() as m:
                if not fast:
                    m.setattr(exec_fast, "is_exec", lambda method, path: False)
                body = json.dumps({"code": "forever", "lang": "py"}).encode()
                holder = await raw(port, f"POST /exec HTTP/1.1\r\nHost: t\r\n{JSON}X-API-Key: {TEST_KEY}\r\n"
                                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await await_until(lambda: program.running == 1, 5, message="a run holding the only slot")
                busy = masked(await ask(port, json.dumps({"code": "sleep:0", "lang": "py"}).encode()))
                assert status_of(busy) == 503 and b"retry-after: <n>" in busy, busy
                expected = program.cancelled + 1
                await holder.aclose()  # the client leaves: its run is cancelled, the slot is free
                await await_until(lambda n=expected: program.cancelled == n and program.running == 0, 5,
                                  message="the run cancelled")
                if fast:
                    first = busy
        assert first == busy, (first, busy)
        with trio.fail_after(10):
            while len([a for a in logs.access() if a["path"] == "/exec"]) < 4:
                await trio.sleep(0.01)
    lines = [line for line in logs.access() if line["path"] == "/exec"]
    assert sorted(line["outcome"] for line in lines) == ["busy", "busy", "client_gone", "client_gone"]
    gone = [line for line in lines if line["outcome"] == "client_gone"]
    assert [line["gone_in_phase"] for line in gone] == ["execute", "execute"]
