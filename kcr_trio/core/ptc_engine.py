"""Programmatic tool calling: the lifecycle of one execution, from first request to final answer.

Live suspension (the default): the first request acquires a sandbox and starts the program in it;
at each batch of tool calls the run *stays suspended in its sandbox* while the answer
``tool_call_required`` goes out, and the continuation's results are handed to the same process.
Nothing runs twice, prints appear once, and every call made concurrently (``asyncio.gather``, bash
background jobs) arrives in one batch. The run is owned by this engine's nursery (the server's
lifetime), never by an HTTP request, and its deadline is the continuation token's lifetime: a
client that never comes back costs at most ``TOKEN_TTL`` seconds of one sandbox slot.

Replay (``live=False``, or taking over an execution whose owning replica is gone): every round
starts the program again in a fresh sandbox and answers the calls it already knows from the
recorded history (``ptc_state.Replayer``); the first batch with a new call ends the round. A
takeover replays once and then continues live on the new replica.

The HTTP edge talks to a running execution through two channels: answers (responses to send) come
out of ``outbox``; results go into ``inbox``. ``busy`` makes concurrent continuations a 409.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import output
from .errors import ApiError
from .exec import ExecRequest, ExecService
from .ids import new_id
from .interfaces import PtcStore, Sandbox
from .model import FileRef, RunResult
from .ptc_state import CANCELLED, TOKEN_TTL, CallRecord, PtcStart, PtcState, Replayer
from .staging import mounts

log = logging.getLogger("kcr_trio.ptc")

# Error strings the client shows the model verbatim (contract §2.7).
TIME_LIMIT = "Time limit exceeded"
OUT_OF_MEMORY = "Out of memory"
FAILED = "Execution failed or timed out"
STATE_MARGIN = 60.0  # keep the stored state a little longer than the token lives


@dataclass
class Live:
    state: PtcState
    outbox_send: trio.MemorySendChannel[dict[str, Any] | ApiError]
    outbox: trio.MemoryReceiveChannel[dict[str, Any] | ApiError]
    inbox_send: trio.MemorySendChannel[list[CallRecord]] | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    busy: bool = False
    running: bool = False  # a run task holds a sandbox for this execution
    suspended: bool = False  # that run waits for the client's results


def new_live(state: PtcState) -> Live:
    send, receive = trio.open_memory_channel[dict[str, Any] | ApiError](4)
    return Live(state, send, receive)


class PtcEngine:
    def __init__(self, service: ExecService, store: PtcStore, *, replica: str, url: str, live: bool,
                 open_run: Callable[..., Any], run_result: Callable[[dict[str, Any]], RunResult],
                 bash_settle: float = 0.05, max_suspended: int = 1000, suspend_max: float = TOKEN_TTL) -> None:
        self.service = service
        self.store = store
        self.replica = replica
        self.url = url
        self.live_mode = live
        self._open_run = open_run
        self._run_result = run_result
        self.bash_settle = bash_settle
        # Each suspended run holds a sandbox slot. Past ``max_suspended`` of them, or once a run has
        # waited ``suspend_max`` seconds, the run is released and its execution continues by replay.
        self.max_suspended = max_suspended
        self.suspend_max = suspend_max
        self.executions: dict[str, Live] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = {"runs": 0, "replayed_calls": 0}

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every suspended run for the server's lifetime; beat the replica heartbeat."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    with trio.move_on_after(5):
                        await self.store.heartbeat(self.replica, self.url, 15)
                except ApiError as exc:
                    log.warning("ptc heartbeat failed: %s", exc.message)
                await trio.sleep(3)

    def suspended_count(self) -> int:
        return sum(1 for live in self.executions.values() if live.suspended)

    # -- entry points ---------------------------------------------------------------------------
    async def start(self, start: PtcStart, principal: str) -> Live:
        state = PtcState(
            execution_id=new_id(), principal=principal, lang=start.lang, code=start.code, tools=start.tools,
            timeout=start.timeout, session_id=start.session_id, files=start.files,
            owner=self.replica, owner_url=self.url, expires_at=time.time() + TOKEN_TTL,
        )
        await self.store.save(state, TOKEN_TTL + STATE_MARGIN)  # 503 here leaves nothing behind
        live = new_live(state)
        self.executions[state.execution_id] = live
        self._spawn(live)
        return live

    def resume(self, live: Live, fresh: list[CallRecord]) -> None:
        """Hand newly answered calls to the run (live), or start the next replay round."""
        if live.suspended and live.inbox_send is not None:
            live.inbox_send.send_nowait(fresh)
        else:
            self._spawn(live)

    def adopt(self, state: PtcState) -> Live:
        """Take over an execution whose owner is gone: the next round replays its history here."""
        state.owner, state.owner_url = self.replica, self.url
        live = new_live(state)
        self.executions[state.execution_id] = live
        return live

    async def cancel(self, live: Live, reason: str = "cancel_request") -> None:
        """Stop the run (its sandbox is killed and released), forget the state, void the token."""
        log.info("ptc execution cancelled", extra={"execution_id": live.state.execution_id, "reason": reason})
        live.state.status = "cancelled"
        live.scope.cancel()
        self.executions.pop(live.state.execution_id, None)
        with trio.move_on_after(5):
            await self.store.delete(live.state.execution_id)
        try:
            live.outbox_send.send_nowait({"status": "error", "error": CANCELLED})
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- the run task ---------------------------------------------------------------------------
    def _spawn(self, live: Live) -> None:
        assert self._nursery is not None, "PtcEngine.serve() is not running"
        live.scope = trio.CancelScope(deadline=trio.current_time() + max(1.0, live.state.expires_at - time.time()))
        live.running = True
        self._nursery.start_soon(self._run_task, live)

    async def _run_task(self, live: Live) -> None:
        state = live.state
        answer: dict[str, Any] | ApiError | None = None
        try:
            with live.scope:
                answer = await self._one_run(live)
            if live.scope.cancelled_caught and state.status != "cancelled":  # the token expired
                log.info("ptc execution expired", extra={"execution_id": state.execution_id})
                state.status = "cancelled"
        except ApiError as exc:
            answer = exc
        except Exception:
            log.exception("ptc run failed", extra={"execution_id": state.execution_id})
            answer = {"status": "error", "error": FAILED, "stderr": "Internal error while running the program",
                      "session_id": state.out_session_id or ""}
        finally:
            live.running = live.suspended = False
            if state.status in ("done", "cancelled") or isinstance(answer, ApiError):
                self.executions.pop(state.execution_id, None)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        if state.status == "done" and isinstance(answer, dict):
                            await self.store.save(state, STATE_MARGIN)  # an identical re-send gets it again
                        else:
                            await self.store.delete(state.execution_id)
                    except ApiError as exc:
                        log.warning("ptc state update failed: %s", exc.message)
        if answer is not None and state.status != "cancelled":
            try:
                live.outbox_send.send_nowait(answer)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _one_run(self, live: Live) -> dict[str, Any] | ApiError | None:
        state = live.state
        svc = self.service
        self.stats["runs"] += 1
        req = ExecRequest(code="", lang="py" if state.lang == "python" else "bash", request_id=state.execution_id,
                          session_id=state.session_id, files=_refs(state.files))
        # The file side is /exec's (``core.staging``): same session choice, refs and mounting.
        session = await svc.staging.choose_session(req)
        state.out_session_id = session.session_id
        notes: list[str] = []
        inputs = await svc.staging.find_inputs(req, session, notes)
        language = "py" if state.lang == "python" else "bash"
        async with svc.executor.sandbox(language, wait=svc.limits.acquire_timeout) as sandbox:
            await svc.staging.send_inputs(sandbox, mounts(inputs, None), notes)
            body = {
                "lang": state.lang, "code": state.code, "request_id": f"{state.execution_id}-{state.generation}",
                "tools": [{"name": t.name, "ident": t.ident, "description": t.description, "params": t.params}
                          for t in state.tools],
                "timeout": state.timeout, "lifetime": TOKEN_TTL * 21,
                "settle": self.bash_settle if state.lang == "bash" else 0.0,
            }
            replayer = Replayer(state.calls)
            async with self._open_run(sandbox, body) as run:
                async for event in run.events():
                    if event.get("event") != "calls":
                        return await self._finish(state, sandbox, event.get("result") or {}, notes)
                    known: dict[str, dict[str, Any]] = {}
                    asked: dict[str, str] = {}  # call id -> sidecar key
                    for call in event.get("calls") or []:
                        record = replayer.match(call["name"], call.get("input"))
                        if record is not None and record.answered:
                            known[call["key"]] = _wire(record)
                            self.stats["replayed_calls"] += 1
                            continue
                        if record is None:
                            if call["name"] not in {t.name for t in state.tools}:
                                known[call["key"]] = {"result": None, "is_error": True,
                                                      "error_message": f"Unknown tool {call['name']!r}"}
                                continue
                            record = state.new_call(call["name"], call.get("input"))
                        asked[record.id] = call["key"]
                    if known:
                        await run.answer(known)
                    if not asked:
                        continue
                    # New calls: hand them to the client and wait (live) or end this round (replay).
                    response = self._calls_required(state)
                    await self.store.save(state, TOKEN_TTL + STATE_MARGIN)
                    if not self.live_mode or self.suspended_count() >= self.max_suspended:
                        live.outbox_send.send_nowait(response)
                        return None  # round over: the stream closes and the sandbox goes
                    live.inbox_send, inbox = trio.open_memory_channel[list[CallRecord]](1)
                    live.suspended = True
                    live.outbox_send.send_nowait(response)
                    live.scope.deadline = trio.current_time() + TOKEN_TTL
                    got: list[CallRecord] | None = None
                    with trio.move_on_after(self.suspend_max):
                        got = await inbox.receive()
                    live.suspended, live.inbox_send = False, None  # from here on resume() replays
                    if got is None:
                        try:
                            got = inbox.receive_nowait()  # results that raced the release
                        except trio.WouldBlock:
                            # Nobody came back in time: free the sandbox; the next round replays.
                            log.info("ptc run released while waiting", extra={"execution_id": state.execution_id})
                            return None
                    fresh = got
                    live.scope.deadline = trio.current_time() + TOKEN_TTL
                    state.status = "running"
                    await run.answer({asked[c.id]: _wire(c) for c in fresh if c.id in asked})
                    # Calls answered that this run never asked (a re-sent old batch) are ignored.
                return {"status": "error", "error": FAILED, "stderr": "The sandbox ended the run without a result",
                        "session_id": state.out_session_id or ""}

    def _calls_required(self, state: PtcState) -> dict[str, Any]:
        token = state.issue()
        state.status = "waiting"
        answer = {
            "status": "tool_call_required",
            "continuation_token": token,
            "tool_calls": [{"id": c.id, "name": c.name, "input": c.input} for c in state.pending],
            "session_id": state.out_session_id or "",
        }
        state.last = answer
        return answer

    async def _finish(self, state: PtcState, sandbox: Sandbox, raw: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        svc = self.service
        result = self._run_result(raw)
        collected = await svc.staging.collect_outputs(sandbox, result, state.out_session_id or "", notes)
        files = collected.files
        stdout, stderr = output.shape_output(result, limit=svc.limits.max_output_chars, timeout=state.timeout)
        if notes:
            stderr = "\n".join([stderr, *notes]).strip()
        answer: dict[str, Any] = {"status": "completed", "stdout": stdout, "stderr": stderr, "files": files,
                                  "session_id": state.out_session_id or ""}
        killed = raw.get("killed")
        if result.timed_out or killed == "timeout":
            answer.update(status="error", error=TIME_LIMIT)
        elif killed == "memory":
            answer.update(status="error", error=OUT_OF_MEMORY)
        elif killed == "output":
            answer.update(status="error", error="stdout length exceeded")
        elif result.failure:
            answer.update(status="error", error=FAILED)
        elif result.exit_code != 0:
            answer.update(status="error", error=f"Sandbox exited with code {result.exit_code}")
        state.status = "done"
        state.last = answer
        return answer


def _wire(call: CallRecord) -> dict[str, Any]:
    return {"result": call.result, "is_error": call.is_error, "error_message": call.error_message}


def _refs(files: list[dict[str, Any]]) -> list[FileRef]:
    refs = []
    for f in files:
        if not isinstance(f, dict):
            continue
        sid = f.get("storage_session_id") or f.get("session_id")
        if isinstance(f.get("id"), str) and isinstance(sid, str) and isinstance(f.get("name"), str):
            refs.append(FileRef(f["id"], sid, f["name"]))
    return refs
