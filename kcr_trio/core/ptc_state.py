"""Programmatic tool calling: the execution record, tokens, validation and limits (no I/O).

One ``PtcState`` per execution, JSON-serialisable so that the Redis store can share it between
replicas. It holds everything a replica needs to take an execution over: the first request (code,
tools, files, timeout), the principal that started it, and every call issued so far with its
answer. Call ids are ``call_001``, ``call_002``, ... in the order the program made them; a replay
finds earlier answers by *(tool, canonical input, occurrence)*, so batch members that arrive in a
different order (bash background jobs) still match.

Statuses and limits follow contract §2.5: a continuation is valid for ``TOKEN_TTL`` seconds after
each ``tool_call_required``; every issued call gets exactly one result; an identical re-send is
accepted and a different one is a 409; per-result and per-state size limits are 413s.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import ApiError
from .ptc_names import identifiers

TOKEN_TTL = 600.0
MAX_TOOLS = 100
MAX_RESULTS = 200  # entries in one continuation
MAX_CALLS = 200  # calls in one execution
MAX_RESULT_BYTES = 5 * 1024 * 1024
MAX_STATE_BYTES = 10 * 1024 * 1024
CALL_ID = re.compile(r"^call_\d{3,6}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")

CANCELLED = "Programmatic execution request cancelled"


def bad(message: str) -> ApiError:
    return ApiError(message, status=400, shape="A")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class ToolSpec:
    name: str
    ident: str
    description: str = ""
    params: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "required"}]


@dataclass
class CallRecord:
    id: str
    name: str
    input: Any
    answered: bool = False
    result: Any = None
    is_error: bool = False
    error_message: str | None = None

    @property
    def signature(self) -> str:
        return self.name + "\x00" + canonical(self.input)

    def answer_key(self) -> str:
        return canonical([self.result, self.is_error, self.error_message if self.is_error else None])


@dataclass
class PtcStart:
    lang: Literal["python", "bash"]
    code: str
    tools: list[ToolSpec]
    timeout: float  # seconds of active run time
    session_id: str | None
    files: list[dict[str, Any]]


@dataclass
class PtcState:
    execution_id: str
    principal: str
    lang: str
    code: str
    tools: list[ToolSpec]
    timeout: float
    session_id: str | None
    files: list[dict[str, Any]]
    owner: str = ""
    owner_url: str = ""
    generation: int = 0
    nonce: str = ""
    expires_at: float = 0.0
    status: Literal["running", "waiting", "done", "cancelled"] = "running"
    calls: list[CallRecord] = field(default_factory=list)
    last: dict[str, Any] | None = None  # the last answer given (re-sent on an identical re-send)
    out_session_id: str | None = None

    # -- tokens ---------------------------------------------------------------------------------
    def issue(self, now: float | None = None) -> str:
        """A fresh token for a new ``tool_call_required``; earlier ones stop being current."""
        self.generation += 1
        self.nonce = secrets.token_urlsafe(12)
        self.expires_at = (time.time() if now is None else now) + TOKEN_TTL
        return self.token()

    def token(self) -> str:
        raw = canonical({"e": self.execution_id, "g": self.generation, "n": self.nonce}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @property
    def pending(self) -> list[CallRecord]:
        return [c for c in self.calls if not c.answered]

    def new_call(self, name: str, value: Any) -> CallRecord:
        if len(self.calls) >= MAX_CALLS:
            raise ApiError(f"Execution exceeded maximum tool calls ({MAX_CALLS})", status=400, shape="A")
        call = CallRecord(id=f"call_{len(self.calls) + 1:03d}", name=name, input=value)
        self.calls.append(call)
        return call

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> PtcState:
        data = json.loads(text)
        data["tools"] = [ToolSpec(**t) for t in data["tools"]]
        data["calls"] = [CallRecord(**c) for c in data["calls"]]
        return cls(**data)

    def check_size(self) -> None:
        if len(self.to_json().encode("utf-8", "replace")) > MAX_STATE_BYTES:
            raise ApiError(f"Request too large: execution state exceeds {MAX_STATE_BYTES} bytes", status=413,
                           shape="A")


class Replayer:
    """Answers a re-run's calls from the history, by (tool, input, occurrence)."""

    def __init__(self, calls: list[CallRecord]) -> None:
        self._calls = calls
        self._used: set[str] = set()

    def match(self, name: str, value: Any) -> CallRecord | None:
        signature = name + "\x00" + canonical(value)
        for call in self._calls:
            if call.id not in self._used and call.signature == signature:
                self._used.add(call.id)
                return call
        return None


# -- requests -------------------------------------------------------------------------------------
def parse_start(body: dict[str, Any], max_execution_time: float) -> PtcStart:
    for key in ("language", "lang"):  # ``language`` is canonical, ``lang`` its alias (§1.3)
        if body.get(key) not in (None, "python", "py", "bash"):
            raise bad("language must be 'python' or 'bash'")
    raw_lang = body.get("language") or body.get("lang")
    if raw_lang in (None, "python", "py"):
        lang: Literal["python", "bash"] = "python"
    elif raw_lang == "bash":
        lang = "bash"
    else:
        raise bad("language must be 'python' or 'bash'")
    code = body.get("code")
    if not isinstance(code, str) or not code.strip():
        raise bad("code must be a non-empty string")
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        raise bad("tools must be a non-empty array")
    if len(tools) > MAX_TOOLS:
        raise bad(f"At most {MAX_TOOLS} tools are allowed")
    specs: dict[str, ToolSpec] = {}
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"].strip():
            raise bad("every tool needs a non-empty string name")
        if tool["name"] in specs:
            continue
        if not isinstance(tool.get("description", ""), (str, type(None))):
            raise bad(f"description of tool {tool['name']!r} must be a string")
        if not isinstance(tool.get("parameters", {}), (dict, type(None))):
            raise bad(f"parameters of tool {tool['name']!r} must be a JSON Schema object")
        params_schema: dict[str, Any] = tool.get("parameters") or {}
        properties = params_schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = params_schema.get("required")
        required = required if isinstance(required, list) else []
        description: str = tool.get("description") or ""
        specs[tool["name"]] = ToolSpec(
            name=tool["name"], ident="", description=description[:4000],
            params=[{"name": p, "required": p in required} for p in properties if isinstance(p, str)],
        )
    try:
        idents = identifiers(list(specs), lang)
    except ValueError as exc:
        raise bad(str(exc)) from None
    for spec in specs.values():
        spec.ident = idents[spec.name]
    timeout = parse_timeout(body.get("timeout"), max_execution_time)
    for name in ("session_id", "runtime_session_hint"):
        if not isinstance(body.get(name), (str, type(None))):
            raise bad(f"{name} must be a string")
    if not isinstance(body.get("files"), (list, type(None))):
        raise bad("files must be an array")
    session_id = body.get("session_id")
    files = body.get("files") or []
    return PtcStart(lang, code, list(specs.values()), timeout, session_id or None, files)


def parse_timeout(value: Any, max_execution_time: float) -> float:
    """``timeout`` in ms → seconds, capped by ``MAX_EXECUTION_TIME``; missing means the cap."""
    if value is None:
        return float(max_execution_time)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise bad("timeout must be a positive number of milliseconds")
    return max(0.1, min(float(value) / 1000.0, float(max_execution_time)))


def parse_token(token: Any) -> tuple[str, int, str]:
    """``(execution_id, generation, nonce)``. A string that is no token of ours names no execution:
    404, like an expired one (a 400 would claim the request itself was malformed, and the tool's
    schema cannot tell the two apart); a missing or non-string token is a 400."""
    if not isinstance(token, str) or not token:
        raise bad("continuation_token must be a non-empty string")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        execution_id, generation, nonce = data["e"], data["g"], data["n"]
        if not isinstance(execution_id, str) or not isinstance(generation, int) or not isinstance(nonce, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise not_found() from None
    return execution_id, generation, nonce


def not_found() -> ApiError:
    return ApiError("Execution not found or expired", status=404, shape="A", headers={"x-kcr-ptc-unknown": "1"})


def parse_results(value: Any) -> list[dict[str, Any]]:
    """Shape checks of ``tool_results`` (400s and the per-result 413)."""
    if not isinstance(value, list) or not value:
        raise bad("tool_results must be a non-empty array")
    if len(value) > MAX_RESULTS:
        raise bad(f"At most {MAX_RESULTS} tool results are allowed per continuation")
    seen: set[str] = set()
    out = []
    for entry in value:
        if not isinstance(entry, dict):
            raise bad("each tool result must be an object")
        call_id = entry.get("call_id")
        if not isinstance(call_id, str) or not CALL_ID.match(call_id):
            raise bad(f"Invalid call_id: {str(call_id)[:40]!r}")
        if call_id in seen:
            raise bad(f"Duplicate call_id: {call_id}")
        seen.add(call_id)
        if "result" not in entry:
            raise bad(f"Tool result {call_id} has no result key")
        is_error = entry.get("is_error", False)
        if not isinstance(is_error, bool):
            raise bad(f"is_error of {call_id} must be a boolean")
        message = entry.get("error_message")
        if message is not None and not isinstance(message, str):
            raise bad(f"error_message of {call_id} must be a string")
        if len(canonical(entry["result"]).encode("utf-8", "replace")) > MAX_RESULT_BYTES:
            raise ApiError(f"Request too large: result of {call_id} exceeds {MAX_RESULT_BYTES} bytes",
                           status=413, shape="A")
        out.append({"call_id": call_id, "result": entry["result"], "is_error": is_error, "error_message": message})
    return out


def apply_results(state: PtcState, results: list[dict[str, Any]]) -> list[CallRecord]:
    """Record answers; return the calls answered now (re-sends excluded).

    Raises 400 for a call never issued or a pending call left without a result, 409 for a re-sent
    result that differs from the recorded one, 413 when the state grows too large.
    """
    by_id = {c.id: c for c in state.calls}
    fresh: list[tuple[CallRecord, dict[str, Any]]] = []
    for entry in results:
        call = by_id.get(entry["call_id"])
        if call is None:
            raise bad(f"call_id {entry['call_id']} was not issued by the sandbox")
        candidate = CallRecord(call.id, call.name, call.input, True, entry["result"], entry["is_error"],
                               entry["error_message"])
        if call.answered:
            if candidate.answer_key() != call.answer_key():
                raise ApiError(f"A different result for {call.id} was already recorded", status=409, shape="A")
            continue
        fresh.append((call, entry))
    answered_now = {call.id for call, _ in fresh}
    missing = [c.id for c in state.pending if c.id not in answered_now]
    if fresh and missing:
        raise bad(f"Missing tool results for: {', '.join(missing[:10])}")
    added = sum(len(canonical(entry["result"]).encode("utf-8", "replace")) for _, entry in fresh)
    if added + len(state.to_json().encode("utf-8", "replace")) > MAX_STATE_BYTES:
        raise ApiError(f"Request too large: execution state would exceed {MAX_STATE_BYTES} bytes", status=413,
                       shape="A")
    for call, entry in fresh:
        call.answered, call.result = True, entry["result"]
        call.is_error, call.error_message = entry["is_error"], entry["error_message"]
    return [call for call, _ in fresh]
