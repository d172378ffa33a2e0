"""All 13 languages through ``/exec`` on the embedded default, at default settings.

Before, only the sidecar-level tests covered all 13, and they ran with the sidecar's own generous
defaults: at the server's defaults Rust failed (``MAX_FILE_SIZE_MB`` = 10 also bound the linker:
``ld terminated with signal 25``) and TypeScript without the ``typescript`` package answered a Node
stack trace. Languages whose toolchain is missing are listed in ``/ready`` with the reason.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.sidecar.test_languages import HELLO
from tests.support.server import TEST_KEY, server_process

pytestmark = pytest.mark.integration
HEADERS = {"X-API-Key": TEST_KEY}


def test_all_13_languages_at_default_settings() -> None:
    with server_process({}) as server:  # nothing overridden: the defaults a new user gets
        ready = httpx.get(server.url + "/ready", timeout=10).json()
        languages = ready["checks"]["executor"]["languages"]
        assert set(languages) == set(HELLO)
        assert all(v == {"available": True} for v in languages.values()), languages
        with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as client:
            results = {}
            for lang, (code, _expected) in HELLO.items():
                resp = client.post("/exec", json={"lang": lang, "code": code})
                assert resp.status_code == 200, (lang, resp.text)
                body = resp.json()
                results[lang] = (body["stdout"].rstrip(), body["stderr"])  # R pads with a space
            assert results == {lang: (expected.rstrip(), "") for lang, (_code, expected) in HELLO.items()}


def test_typescript_without_the_package_is_a_clear_error() -> None:
    with server_process({"KCR_LOCAL_NODE_PATH": "/nonexistent-node-modules"}) as server:
        ready = httpx.get(server.url + "/ready", timeout=10).json()
        ts = ready["checks"]["executor"]["languages"]["ts"]
        assert ts["available"] is False and "npm install -g typescript" in ts["reason"]
        assert ready["checks"]["executor"]["languages"]["js"] == {"available": True}
        resp = httpx.post(server.url + "/exec", headers=HEADERS, timeout=60,
                          json={"lang": "ts", "code": "const a: number = 1; console.log(a);"})
        assert resp.status_code == 503, resp.text
        body = resp.json()
        text = str(body)
        assert "typescript" in text and "npm install -g typescript" in text, body
        assert "Cannot find module" not in text


def test_compile_timeout_is_a_clear_error_through_exec() -> None:
    from tests.integration.sidecar.test_limits import SLOW_COMPILE

    with server_process({"KCR_COMPILE_TIMEOUT": "2", "MAX_EXECUTION_TIME": "20"}) as server:
        resp = httpx.post(server.url + "/exec", headers=HEADERS, timeout=120,
                          json={"lang": "cpp", "code": SLOW_COMPILE})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert "Compilation timed out after 2 seconds" in body["stderr"], body
        assert "KCR_COMPILE_TIMEOUT" in body["stderr"] and "Execution timed out" not in body["stderr"], body
        # The slot is free again and the next compiled run is normal.
        ok = httpx.post(server.url + "/exec", headers=HEADERS, timeout=120,
                        json={"lang": "c", "code": '#include <stdio.h>\nint main(void) { puts("ok"); }'})
        assert ok.status_code == 200 and ok.json()["stdout"] == "ok\n", ok.text
