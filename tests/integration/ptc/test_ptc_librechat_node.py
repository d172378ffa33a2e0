"""The real ``@librechat/agents`` 3.9.x PTC tools (``run_tools_with_code``, ``run_tools_with_bash``,
and the plain ``/exec`` fallback with ``tool_manifest: []``) against real ``kcr-trio serve``
processes, with real tool functions defined in Node (``tests/node/ptc_client.mjs``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.ptc.test_ptc_replicas import replicas  # noqa: F401  (fixture)
from tests.support.server import TEST_KEY, ServerProcess, wait_until

pytestmark = [pytest.mark.integration]
SCRIPT = Path(__file__).resolve().parents[2] / "node" / "ptc_client.mjs"


def run_client(backends: list[str], code: str, kind: str = "code", **extra: Any) -> dict[str, Any]:
    if shutil.which("node") is None:
        pytest.fail("node is required (scripts/install.sh installs it)")
    scenario = {"backends": backends, "key": TEST_KEY, "kind": kind, "code": code, **extra}
    done = subprocess.run(["node", str(SCRIPT), json.dumps(scenario)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def posts(result: dict[str, Any], path: str = "/exec/programmatic") -> list[dict[str, Any]]:
    return [r for r in result["requests"] if r["path"] == path]


def test_one_call(ptc_server: ServerProcess) -> None:
    result = run_client([ptc_server.url], "w = await get_weather(city='Oslo')\nprint(w['temp'])\n")
    assert result["ok"], result
    assert result["content"].startswith("stdout:\n14")
    assert result["invocations"] == [{"tool": "get-weather", "city": "Oslo"}]
    assert len(posts(result)) == 2


def test_sequential_calls_and_gather(ptc_server: ServerProcess) -> None:
    code = ("print('once')\n"
            "s = 0\nfor i in range(3):\n    s = (await add(a=s, b=i + 1))['sum']\nprint('seq', s)\n"
            "import asyncio\nws = await asyncio.gather(*[get_weather(city=c) for c in ['A', 'Bb', 'Ccc', 'Dddd', 'Eeeee']])\n"
            "print('gather', [w['temp'] for w in ws])\n")
    result = run_client([ptc_server.url], code)
    assert result["ok"], result
    assert result["content"].startswith("stdout:\nonce\nseq 6\ngather [11, 12, 13, 14, 15]")
    # 3 sequential rounds + 1 round for all five gathered calls, plus the first request.
    assert len(posts(result)) == 1 + 3 + 1
    assert result["content"].count("once") == 1


def test_tool_error_raises_in_python(ptc_server: ServerProcess) -> None:
    code = ("try:\n    await explode()\nexcept ToolExecutionError as e:\n    print('caught:', e)\n"
            "await explode()\n")
    result = run_client([ptc_server.url], code)
    assert not result["ok"]
    error = result.get("error") or result.get("content")
    assert "Programmatic execution failed: Code execution failed. Execution exited with code 1" in error, result
    assert "ToolExecutionError: the explode tool failed on purpose" in error


def test_timeout(ptc_server: ServerProcess) -> None:
    code = "await get_weather(city='x')\nwhile True:\n    pass\n"
    result = run_client([ptc_server.url], code, timeout=2000)
    assert not result["ok"]
    error = result.get("error") or result.get("content")
    assert "Code execution failed. Execution exceeded the time limit." in error, result


@pytest.mark.parametrize(("abort_ms", "via"), [(300, "cancel_request"), (3000, "client_gone")],
                         ids=["before-commit", "behind-heartbeat"])
def test_cancel_during_a_run(ptc_server: ServerProcess, abort_ms: int, via: str) -> None:
    """Stop during a run. Before the heartbeat commits the 200 the client sends
    ``/exec/programmatic/cancel``; once the head is out it only drops the connection (3.9.2 removes
    its abort listener when the head arrives), which cancels the execution too."""
    code = f"import time\ntime.sleep(20)  # {via}\nw = await get_weather(city='x')\nprint('never')\n"
    before = len(ptc_server.log_lines())
    result = run_client([ptc_server.url], code, abortAfterMs=abort_ms)
    assert not result["ok"], result
    assert result["invocations"] == []
    cancels = posts(result, "/exec/programmatic/cancel")
    if via == "cancel_request":
        assert len(cancels) == 1 and cancels[0]["status"] == 202, result["requests"]

    def cancelled() -> bool:
        return any("ptc execution cancelled" in line and f'"reason":"{via}"' in line
                   for line in ptc_server.log_lines()[before:])

    wait_until(cancelled, 10, message=f"the server to cancel the execution ({via})")


def test_bash_tool(ptc_server: ServerProcess) -> None:
    code = ("echo start\n"
            "w=$(get_weather '{\"city\":\"Oslo\"}')\n"
            "echo \"$w\" | jq -r .temp\n"
            "add '{\"a\":1,\"b\":2}' > s1.json & add '{\"a\":3,\"b\":4}' > s2.json & wait\n"
            "jq -s 'map(.sum) | add' s1.json s2.json\n")
    result = run_client([ptc_server.url], code, kind="bash")
    assert result["ok"], result
    assert result["content"].startswith("stdout:\nstart\n14\n10")
    assert len(posts(result)) == 1 + 1 + 1  # the two background calls went out together


def test_plain_fallback_with_empty_manifest(ptc_server: ServerProcess) -> None:
    result = run_client([ptc_server.url], "import asyncio\nawait asyncio.sleep(0)\nprint('plain')\n", manifest=[])
    assert result["ok"], result
    assert result["content"].startswith("stdout:\nplain")
    assert posts(result) == [] and len(posts(result, "/exec")) == 1


def test_continuation_sent_to_a_second_replica(replicas: tuple[ServerProcess, ServerProcess]) -> None:  # noqa: F811
    a, b = replicas
    code = ("import random\nx = random.random()\n"
            "w1 = await get_weather(city='Oslo')\nw2 = await get_weather(city='Rome')\n"
            "print(w1['temp'] + w2['temp'], x == x)\n")
    result = run_client([a.url, b.url], code)
    assert result["ok"], result
    assert result["content"].startswith("stdout:\n28 True")
    assert sorted({r["backend"] for r in posts(result)}) == [0, 1]
