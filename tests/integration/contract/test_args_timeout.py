"""``args`` reach argv and ``timeout`` is milliseconds (contract §1.1, §4.3), with real sidecars."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration

H = {"X-API-Key": TEST_KEY}
# Arguments a shell would mangle: spaces, quotes, globs, $, an empty string, non-ASCII.
ARGS = ["plain", "two words", "it's \"quoted\"", "*.txt", "$HOME", "", "ünï"]

PROGRAMS = {
    "py": "import sys, json\nprint(json.dumps(sys.argv[1:]))",
    "js": "console.log(JSON.stringify(process.argv.slice(2)))",
    "ts": "const a: string[] = process.argv.slice(2);\nconsole.log(JSON.stringify(a))",
    "bash": "python3 -c 'import sys, json; print(json.dumps(sys.argv[1:]))' \"$@\"",
}


def post(server: ServerProcess, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/exec", json=body, headers=H, timeout=60)


@pytest.mark.parametrize("lang", sorted(PROGRAMS))
def test_args_are_argv(real_server: ServerProcess, lang: str) -> None:
    r = post(real_server, {"lang": lang, "code": PROGRAMS[lang], "args": ARGS})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["stdout"]) == ARGS, r.json()
    # Without args the program sees none (and the pre-warmed path is used again).
    r = post(real_server, {"lang": lang, "code": PROGRAMS[lang]})
    assert r.json()["stdout"].strip() == "[]", r.json()


def test_bash_positional_parameters(real_server: ServerProcess) -> None:
    r = post(real_server, {"lang": "bash", "code": 'echo "$#|$1|$2|$0"', "args": ["a b", "c"]})
    assert r.json()["stdout"].strip() == "2|a b|c|code.sh"


def test_timeout_is_milliseconds_and_capped(real_server: ServerProcess) -> None:
    started = time.monotonic()
    r = post(real_server, {"lang": "py", "code": "import time\ntime.sleep(5)\nprint('late')", "timeout": 2000})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert "late" not in r.json()["stdout"]
    assert "timed out after 2 seconds" in r.json()["stderr"]
    assert elapsed < 4.5  # 2 s, not MAX_EXECUTION_TIME (6 s) and not 1500 s
    # A huge value is capped at MAX_EXECUTION_TIME, never refused; a short run is unaffected.
    r = post(real_server, {"lang": "py", "code": "print('ok')", "timeout": 10**9})
    assert r.status_code == 200 and r.json()["stdout"] == "ok\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number of milliseconds"),
        ({"timeout": -5}, "timeout must be a positive number of milliseconds"),
        ({"timeout": "1000"}, "timeout must be a positive number of milliseconds"),
        ({"timeout": True}, "timeout must be a positive number of milliseconds"),
        ({"args": "one string"}, "args must be an array of strings"),
        ({"args": [1, 2]}, "args must be an array of strings"),
        ({"args": ["a\u0000b"]}, "args must not contain NUL characters"),
        ({"args": ["x"] * 257}, "args may hold at most 256 items"),
    ],
)
def test_bad_args_and_timeout_are_400(real_server: ServerProcess, body: dict, message: str) -> None:
    r = post(real_server, {"lang": "py", "code": "print(1)", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == message
