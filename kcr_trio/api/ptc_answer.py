"""The answer of one ``/exec/programmatic`` round: plain, or a committed ``200`` behind heartbeats.

The decision is ``/exec``'s (``api.exec_commit``, driven by ``api.commit_driver``): an answer that
comes within ``KCR_HEARTBEAT_GRACE`` is sent plainly, status and all; a slower one commits ``200`` and
sends a space at least every ``KCR_HEARTBEAT_INTERVAL`` (``keepalive.md``). One rule differs: PTC
never *holds* the commit while a sandbox is being acquired. Its run belongs to the engine's nursery,
not to the request, and reports no acquisition; a failure after the commit is written as
``{"status":"error",...}``, which is what the client can read (contract §1.0.1). So the policy it
gets has no hold (``hold_max = 0``).

What is PTC's own: the round's request id is marked done (or cancelled) once its answer is out,
the execution is free for its next continuation (``busy``), and a client that leaves before its
answer cancels the execution, since without the answer it could never continue it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import trio
from quart import Response

from kcr_trio.core.errors import ApiError
from kcr_trio.core.ptc_engine import FAILED, Live, PtcEngine
from kcr_trio.core.ptc_state import CANCELLED, TOKEN_TTL

from .commit_driver import Driver, heartbeats
from .errors import dumps
from .exec_commit import HEARTBEAT_HEADERS, AnswerNow, Commit, CommitPolicy, ExecCommit
from .services import json_response, services

Answer = dict[str, Any] | ApiError

REQUEST_RECORD_TIMEOUT = 2.0
"""Seconds to mark the request id done before the answer goes out anyway (a store outage must not
hold an answer; the id then reads as active until it lapses)."""

CANCEL_TIMEOUT = 5.0
"""Seconds a client-gone cancel may take (shielded: it runs while the request is being torn down)."""


def record(principal: str, eid: str | None, status: str) -> dict[str, Any]:
    """What a request id is stored with: who sent it, for which execution, and how it ended."""
    return {"principal": principal, "execution_id": eid, "status": status}


async def respond(engine: PtcEngine, live: Live, rid: str | None, principal: str) -> Response:
    """The next answer of ``live``: plain if it comes within the grace, else behind a heartbeat."""
    policy = dataclasses.replace(CommitPolicy.from_settings(services().settings), hold_max=0.0)
    driver: Driver[Answer] = Driver(ExecCommit(policy), live.outbox)
    round_ = _Round(engine, live, rid, principal)
    try:
        action = await driver.decide()
        if isinstance(action, AnswerNow):
            answer = await round_.finished(driver.take())
            if isinstance(answer, ApiError):
                raise answer
            return json_response(answer)
    except BaseException:
        if not round_.delivered:
            await round_.abandon()
        raise
    if not isinstance(action, Commit):
        raise AssertionError(f"unexpected action before the commit: {action}")
    return Response(round_.body(driver), status=200, content_type="application/json",
                    headers=HEARTBEAT_HEADERS)


class _Round:
    """One round's bookkeeping around its answer."""

    def __init__(self, engine: PtcEngine, live: Live, rid: str | None, principal: str) -> None:
        self.engine, self.live, self.rid, self.principal = engine, live, rid, principal
        self.delivered = False

    async def finished(self, answer: Answer) -> Answer:
        """The answer is going out: free the execution, mark the request id."""
        self.delivered = True
        self.live.busy = False
        if self.rid is not None:
            with trio.move_on_after(REQUEST_RECORD_TIMEOUT):
                try:
                    status = "cancelled" if isinstance(answer, dict) and answer.get("error") == CANCELLED else "done"
                    await self.engine.store.set_request(
                        self.rid, record(self.principal, self.live.state.execution_id, status), TOKEN_TTL)
                except ApiError:
                    pass
        return answer

    async def final(self, answer: Answer) -> bytes:
        """The committed answer's last bytes; an error becomes the PTC error body."""
        answer = await self.finished(answer)
        if isinstance(answer, ApiError):
            answer = {"status": "error", "error": FAILED, "stderr": answer.message,
                      "session_id": self.live.state.out_session_id or ""}
        return dumps(answer)

    async def abandon(self) -> None:
        """The answer will not reach the client: cancel the execution unless it already ended."""
        self.live.busy = False
        if not self.delivered and self.live.state.status not in ("done", "cancelled"):
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_TIMEOUT):
                await self.engine.cancel(self.live, "client_gone")

    async def body(self, driver: Driver[Answer]) -> AsyncIterator[bytes]:
        try:
            async with aclosing(heartbeats(driver, self.final)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await self.abandon()
