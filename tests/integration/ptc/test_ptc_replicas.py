"""Two real ``kcr-trio serve`` replicas on one real redis-server: a continuation may land on either.

* owner alive → the other replica forwards it; the run stays live (a random value drawn before the
  call still matches after it, which a replay could not do);
* owner gone → the other replica takes the execution over and replays it from the stored history,
  correctly (prints once in the final stdout, later calls continue live there).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.integration.ptc.conftest import PTC_ENV
from tests.integration.ptc.test_ptc_http import WEATHER, answer, post, results_for
from tests.support.server import ServerProcess, server_process, wait_until

ECHO = {"name": "echo", "parameters": {"type": "object", "properties": {"v": {}}, "required": ["v"]}}


@pytest.fixture()
def replicas() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    from tests.support.redis_server import running_redis

    with running_redis() as redis:
        env = {**PTC_ENV, **redis.env(prefix="ptcrep:"), "KCR_SESSION_STORE": "redis"}
        with server_process(env) as a, server_process(env) as b:
            yield a, b


def echo_results(calls: list[dict]) -> list[dict]:
    return [{"call_id": c["id"], "result": c["input"], "is_error": False} for c in calls]


def test_continuation_on_the_other_replica_is_forwarded_live(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    code = ("import random\nx = random.random()\nprint('drawn')\n"
            "r = await echo(v=x)\nprint(r['v'] == x)\n")
    data = answer(post(a, {"code": code, "tools": [ECHO]}))
    data = answer(post(b, {"continuation_token": data["continuation_token"], "tool_results": echo_results(data["tool_calls"])}))
    assert data["status"] == "completed", data
    assert data["stdout"] == "drawn\nTrue\n"
    # B logs the forward before it answers, but the test reads B's stderr through a reader
    # thread, which may not have seen the line yet when the answer arrives.
    wait_until(lambda: any("forwarded to its owner" in line for line in b.log_lines()), 10,
               message="B's log line about the forward")


def test_owner_gone_replay_is_correct(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    code = ("print('start')\nx = await get_weather(city='Oslo')\nprint('first', x['n'])\n"
            "y = await get_weather(city='Lima!')\nprint('second', y['n'])\n")
    data = answer(post(a, {"code": code, "tools": [WEATHER]}))
    first_calls = data["tool_calls"]
    os.killpg(a.pid, signal.SIGKILL)  # the owner dies with its suspended run
    wait_until(lambda: a.proc.poll() is not None, 10, message="replica A gone")
    data = answer(post(b, {"continuation_token": data["continuation_token"], "tool_results": results_for(first_calls)}))
    # B replayed call_001 from the history and now waits, live, for the new call.
    assert data["status"] == "tool_call_required"
    assert [(c["id"], c["input"]) for c in data["tool_calls"]] == [("call_002", {"city": "Lima!"})]
    wait_until(lambda: any("taken over for replay" in line for line in b.log_lines()), 10,
               message="B's log line about the take-over")
    data = answer(post(b, {"continuation_token": data["continuation_token"],
                           "tool_results": results_for(data["tool_calls"])}))
    assert data["status"] == "completed"
    assert data["stdout"] == "start\nfirst 4\nsecond 5\n"
