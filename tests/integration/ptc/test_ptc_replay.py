"""Replay, the mode the official server always uses: correct results in a fresh sandbox per round.

Covered three ways: a server with live suspension off (``KCR_PTC_LIVE=false``, the benchmark's
comparison point), a live run released after ``KCR_PTC_SUSPEND_MAX`` (its slot is freed; the next
round replays), and ``KCR_PTC_MAX_SUSPENDED=0`` (no run may stay suspended).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.ptc.conftest import PTC_ENV
from tests.integration.ptc.test_ptc_http import WEATHER, answer, post, results_for
from tests.support.server import ServerProcess, server_process, wait_until

SEQ = ("print('start')\nimport asyncio\na = await get_weather(city='Oslo')\n"
       "bs = await asyncio.gather(get_weather(city='A'), get_weather(city='Bb'))\n"
       "print(a['n'], [b['n'] for b in bs])\n")


@pytest.fixture(scope="module", params=["live-off", "max-suspended-0"])
def replay_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    env = {"KCR_PTC_LIVE": "false"} if request.param == "live-off" else {"KCR_PTC_MAX_SUSPENDED": "0"}
    with server_process({**PTC_ENV, **env}) as server:
        yield server


def drive(server: ServerProcess, body: dict) -> tuple[list[int], dict]:
    data = answer(post(server, body))
    rounds = []
    while data["status"] == "tool_call_required":
        rounds.append(len(data["tool_calls"]))
        data = answer(post(server, {"continuation_token": data["continuation_token"],
                                    "tool_results": results_for(data["tool_calls"])}))
    return rounds, data


def test_replay_is_correct(replay_server: ServerProcess) -> None:
    rounds, data = drive(replay_server, {"code": SEQ, "tools": [WEATHER]})
    assert rounds == [1, 2]  # gathered calls stay one round trip under replay too
    assert data["status"] == "completed" and data["stdout"] == "start\n4 [1, 2]\n"


def test_replay_bash(replay_server: ServerProcess) -> None:
    code = (': &\nwait "$!"\necho start\nx=$(get_weather \'{"city":"abc"}\')\n'
            'get_weather \'{"city":"a"}\' > a & get_weather \'{"city":"bb"}\' > b & wait\n'
            'echo "$x" | jq .n; cat a b | jq -s "map(.n) | add"\n')
    rounds, data = drive(replay_server, {"lang": "bash", "code": code, "tools": [WEATHER]})
    assert rounds == [1, 2]
    assert data["stdout"] == "start\n3\n3\n"


def test_live_run_released_after_suspend_max_then_replayed() -> None:
    with server_process({**PTC_ENV, "KCR_PTC_SUSPEND_MAX": "1"}) as server:
        data = answer(post(server, {"code": SEQ, "tools": [WEATHER]}))
        wait_until(lambda: any("ptc run released while waiting" in line for line in server.log_lines()), 20,
                   message="the suspended run to be released")
        rounds = [len(data["tool_calls"])]
        while data["status"] == "tool_call_required":
            data = answer(post(server, {"continuation_token": data["continuation_token"],
                                        "tool_results": results_for(data["tool_calls"])}))
            if data["status"] == "tool_call_required":
                rounds.append(len(data["tool_calls"]))
        assert rounds == [1, 2]
        assert data["stdout"] == "start\n4 [1, 2]\n"
