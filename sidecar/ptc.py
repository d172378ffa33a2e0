"""Programmatic tool calling in the sidecar: a run that stays alive while its tool calls are answered.

Two routes, hooked into ``app.App.route``:

``POST /ptc/start`` ``{lang, code, tools, timeout, lifetime, settle, request_id}``
    Builds the program (``ptc_program``), prepares the call channel (``.kcr-ptc`` in the working
    directory, see ``ptc_harness.py``) and runs it with the ordinary runner. The answer is a stream
    of JSON lines: ``{"event": "calls", "calls": [{"key", "name", "input"}]}`` for every batch of
    calls, then one ``{"event": "done", "result": <the /execute answer>}``. The stream *is* the
    run's owner: when the caller closes it, the run is killed exactly as a disconnected
    ``/execute`` is.
``POST /ptc/results`` ``{"run": <request_id>, "results": {key: {result, is_error, error_message}}}``
    Answers calls of the last batch; a caller blocked on them continues.

Time: ``timeout`` (seconds) is the run's *active* budget: the clock stops while a batch waits for the
client, so a run gets the same time it would get as one replay iteration (contract §2.5), without
being charged for the client's tools. ``lifetime`` caps the whole run, waiting included.

Batching: a Python request already holds every call of one event-loop turn (``asyncio.gather``).
Bash calls arrive one per process; with ``settle`` > 0 the batch is sent once no new call arrived
for that long, so background jobs (``a & b & wait``) go out together (§2.9).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import ptc_program
from .runner import Conflict, Runner, log

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHANNEL_DIR = ".kcr-ptc"
MAX_REQUEST_BYTES = 8 * 1024 * 1024
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PtcError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Request:
    reply: str
    keys: list[str]


@dataclass
class PtcRun:
    run_id: str
    dfd: int
    uid: int | None
    gid: int | None
    requests: dict[str, _Request] = field(default_factory=dict)
    outstanding: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # key -> answer
    waiting: trio.Event = field(default_factory=trio.Event)  # set while a batch waits for answers
    resumed: trio.Event = field(default_factory=trio.Event)

    def answer(self, results: dict[str, Any]) -> int:
        unknown = [k for k in results if k not in self.outstanding]
        if unknown:
            raise PtcError(409, f"not waiting for {', '.join(sorted(unknown)[:5])}")
        for key, value in results.items():
            self.outstanding[key] = value if isinstance(value, dict) else {"result": value}
        delivered = 0
        for ident, req in list(self.requests.items()):
            if all(self.outstanding.get(k) is not None for k in req.keys):
                self._deliver(ident, req, [self.outstanding.pop(k) or {} for k in req.keys])
                del self.requests[ident]
                delivered += 1
        if not self.outstanding:
            self.waiting = trio.Event()
            self.resumed.set()
        return delivered

    def fail(self, ident: str, reply: str, count: int, message: str) -> None:
        err = {"result": None, "is_error": True, "error_message": message}
        self._deliver(ident, _Request(reply, []), [err] * max(count, 1))

    def _deliver(self, ident: str, req: _Request, answers: list[dict[str, Any]]) -> None:
        data = json.dumps({"results": [
            {"result": a.get("result"), "is_error": bool(a.get("is_error")),
             "error_message": a.get("error_message")} for a in answers]}).encode("utf-8")
        tmp, final = f"t.{ident}.a", f"a.{ident}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=self.dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, final, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            if _ID.match(req.reply):
                ring = os.open(req.reply, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=self.dfd)
                try:
                    if stat.S_ISFIFO(os.fstat(ring).st_mode):
                        os.write(ring, (ident + "\n").encode())
                finally:
                    os.close(ring)
        except OSError as exc:  # the caller went away or removed its FIFO: nobody to tell
            log("ptc_reply_failed", run=self.run_id, request=ident, error=str(exc))


class PtcRoutes:
    """State shared by the two routes: the one run this sidecar may hold."""

    def __init__(self, runner: Runner, working_dir: str) -> None:
        self.runner = runner
        self.working_dir = working_dir
        self.runs: dict[str, PtcRun] = {}

    async def handle(self, path: str, body: bytes, receive: Receive, send: Send) -> None:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise PtcError(422, "body is not JSON") from None
        if not isinstance(req, dict):
            raise PtcError(422, "body must be an object")
        if path == "/ptc/results":
            run = self.runs.get(str(req.get("run")))
            if run is None:
                raise PtcError(404, "no such run")
            results = req.get("results")
            if not isinstance(results, dict):
                raise PtcError(422, "results must be an object")
            delivered = run.answer(results)
            return await _send_json(send, 200, {"delivered": delivered})
        if path == "/ptc/start":
            return await self.start(req, receive, send)
        raise PtcError(404, "Not Found")

    async def start(self, req: dict[str, Any], receive: Receive, send: Send) -> None:
        lang = "bash" if req.get("lang") == "bash" else "python"
        code, rid = req.get("code"), str(req.get("request_id") or "ptc")
        timeout, lifetime = req.get("timeout"), req.get("lifetime")
        settle = float(req.get("settle") or 0.0)
        if not isinstance(code, str) or not _number(timeout) or not _number(lifetime):
            raise PtcError(422, "code, timeout and lifetime are required")
        if (lang == "bash") != (self.runner.spec.code == "bash"):
            raise PtcError(422, f"this sidecar runs {self.runner.spec.code}, not {lang}")
        channel = f"{CHANNEL_DIR}-{secrets.token_hex(6)}"
        try:
            program = ptc_program.build(lang, code, req.get("tools"), channel)
        except ptc_program.ProgramError as exc:
            raise PtcError(422, str(exc)) from None
        if self.runner.busy or rid in self.runs:
            raise PtcError(409, "An execution is already running in this sidecar")
        run = self._prepare(rid, channel)
        self.runs[rid] = run
        try:
            await self._serve(run, program, float(timeout), float(lifetime), settle,  # type: ignore[arg-type]
                              receive, send)
        finally:
            del self.runs[rid]
            os.close(run.dfd)
            shutil.rmtree(os.path.join(self.working_dir, channel), ignore_errors=True)
            self.runner.replenish()

    def _prepare(self, rid: str, channel: str) -> PtcRun:
        path = os.path.join(self.working_dir, channel)
        os.mkdir(path, 0o700)
        ident = self.runner.identity
        uid, gid = (ident.uid, ident.gid) if ident.switching else (None, None)
        os.mkfifo(os.path.join(path, "in"), 0o600)
        if uid is not None:
            os.chown(path, uid, gid)  # type: ignore[arg-type]
            os.chown(os.path.join(path, "in"), uid, gid)  # type: ignore[arg-type]
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return PtcRun(rid, dfd, uid, gid)

    async def _serve(self, run: PtcRun, program: str, timeout: float, lifetime: float, settle: float,
                     receive: Receive, send: Send) -> None:
        events_send, events = trio.open_memory_channel[dict[str, Any]](16)
        budget_spent = False
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log("ptc_client_disconnected", run=run.run_id)
                nursery.cancel_scope.cancel()

            async def execute() -> None:
                nonlocal budget_spent
                async with events_send:
                    with trio.CancelScope() as run_scope:
                        nursery.start_soon(budget, run_scope)
                        try:
                            result = await self.runner.execute(program, lifetime, run.run_id)
                        except Conflict as exc:
                            result = {"exit_code": -1, "stdout": "", "stderr": str(exc), "failure": str(exc)}
                    if run_scope.cancelled_caught:
                        budget_spent = True
                        result = {"exit_code": 124, "stdout": "", "timed_out": True,
                                  "stderr": f"Execution timed out after {timeout:g} seconds"}
                    await events_send.send({"event": "done", "result": result})

            async def budget(run_scope: trio.CancelScope) -> None:
                remaining = timeout
                while True:
                    started = trio.current_time()
                    waiting = run.waiting
                    with trio.move_on_after(remaining):
                        await waiting.wait()
                    remaining -= trio.current_time() - started
                    if remaining <= 0:
                        run_scope.cancel()
                        return
                    await run.resumed.wait()

            nursery.start_soon(watch)
            nursery.start_soon(self._read_calls, run, settle, events_send.clone())
            nursery.start_soon(execute)
            async for event in events:
                await send({"type": "http.response.body", "body": json.dumps(event).encode() + b"\n",
                            "more_body": event["event"] != "done"})
                if event["event"] == "done":
                    break
            nursery.cancel_scope.cancel()
        log("ptc_run_finished", run=run.run_id, budget_spent=budget_spent)

    async def _read_calls(self, run: PtcRun, settle: float, out: trio.MemorySendChannel[dict[str, Any]]) -> None:
        """Doorbell lines → request files → batches of calls on ``out``."""
        rfd = os.open("in", os.O_RDONLY | os.O_NONBLOCK, dir_fd=run.dfd)
        keep = os.open("in", os.O_WRONLY | os.O_NONBLOCK, dir_fd=run.dfd)  # no EOF between writers
        stream = trio.lowlevel.FdStream(rfd)
        buffer = b""
        batch: list[dict[str, Any]] = []
        try:
            async with out:
                while True:
                    chunk = b""
                    if batch and settle > 0:
                        with trio.move_on_after(settle):
                            chunk = await stream.receive_some(4096)
                    elif not batch:
                        chunk = await stream.receive_some(4096)
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        batch.extend(self._read_request(run, line.decode("ascii", "replace").strip()))
                    if batch and (not chunk or settle <= 0):
                        run.resumed = trio.Event()
                        for call in batch:
                            run.outstanding[call["key"]] = None
                        run.waiting.set()
                        await out.send({"event": "calls", "calls": batch})
                        batch = []
        finally:
            await stream.aclose()
            os.close(keep)

    def _read_request(self, run: PtcRun, ident: str) -> list[dict[str, Any]]:
        if not _ID.match(ident):
            return []
        try:
            fd = os.open(f"q.{ident}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=run.dfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REQUEST_BYTES:
                    raise ValueError(f"tool request larger than {MAX_REQUEST_BYTES} bytes")
                with os.fdopen(os.dup(fd), "rb") as handle:
                    data = json.loads(handle.read())
            finally:
                os.close(fd)
                os.unlink(f"q.{ident}", dir_fd=run.dfd)
            reply, calls = data["reply"], data["calls"]
            if not isinstance(reply, str) or not isinstance(calls, list) or not calls:
                raise ValueError("malformed tool request")
            keys = [f"{ident}.{i}" for i in range(len(calls))]
            run.requests[ident] = _Request(reply, keys)
            return [{"key": k, "name": str(c.get("name")), "input": c.get("input")} for k, c in zip(keys, calls)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = f"r.{ident}" if ident.startswith("b") else "r.py"
            run.fail(ident, reply, 1, f"invalid tool request: {exc}")
            return []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def route(app: Any, path: str, receive: Receive, send: Send) -> None:
    """The hook ``app.App.route`` calls for ``POST /ptc/*`` (one ``PtcRoutes`` per sidecar)."""
    routes = getattr(app, "_ptc_routes", None)
    if routes is None:
        routes = app._ptc_routes = PtcRoutes(app.runner, app.cfg.working_dir)
    from .app import read_body

    body = await read_body(receive, MAX_REQUEST_BYTES * 4)
    try:
        await routes.handle(path, body, receive, send)
    except PtcError as exc:
        await _send_json(send, exc.status, {"detail": exc.detail})
