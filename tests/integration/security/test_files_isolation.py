"""Finding 1: a run sees another user's upload only when the request lists it.

LibreChat sends the agent id as ``entity_id`` on ``/upload`` (so every user of one agent lands in
one session) and identifies the user with the ``User-Id`` header (upload) and ``user_id`` (exec).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.server import TEST_KEY, ServerProcess

pytestmark = pytest.mark.integration
H = {"X-API-Key": TEST_KEY}
LIST = "import os, json; print(json.dumps(sorted(n for n in os.listdir('/mnt/data') if n != 'code.py')))"


@pytest.fixture
def client(security_server: ServerProcess):
    with httpx.Client(base_url=security_server.url, timeout=30) as c:
        yield c


def _upload(client: httpx.Client, user: str, name: str, data: bytes, entity: str) -> dict:
    r = client.post("/upload", files={"file": (name, data, "text/plain")}, data={"entity_id": entity},
                    headers={**H, "User-Id": user})
    assert r.status_code == 200, r.text
    return r.json()


def _listing(client: httpx.Client, body: dict) -> list[str]:
    r = client.post("/exec", json={"lang": "py", "code": LIST, **body}, headers=H)
    assert r.status_code == 200, r.text
    return json.loads(r.json()["stdout"])


def test_other_users_upload_in_a_shared_entity_session_is_not_mounted(client) -> None:
    alice = _upload(client, "alice", "alice_private.csv", b"secret", "agent_shared")
    bob = _upload(client, "bob", "bob.txt", b"hello", "agent_shared")
    assert alice["session_id"] == bob["session_id"]  # the entity's session is shared, as in KubeCodeRun
    sid = bob["session_id"]
    ref = {"id": bob["files"][0]["fileId"], "session_id": sid, "name": "bob.txt"}
    seen = _listing(client, {"user_id": "bob", "files": [ref]})
    assert "alice_private.csv" not in seen and "bob.txt" in seen
    # An agent's file listed by the request is mounted for anyone (that is how agents share files).
    alice_ref = {"id": alice["files"][0]["fileId"], "session_id": sid, "name": "alice_private.csv"}
    assert "alice_private.csv" in _listing(client, {"user_id": "bob", "files": [ref, alice_ref]})


def test_own_unlisted_uploads_stay_mounted_for_the_same_user(client) -> None:
    """The "uploads vanish" fix still holds, scoped to the uploader."""
    up = _upload(client, "carol", "carol.csv", b"c", "agent_carol")
    sid = up["session_id"]
    _upload(client, "dave", "dave.csv", b"d", "agent_carol")
    assert _listing(client, {"user_id": "carol", "session_id": sid}) == ["carol.csv"]
    # The header identifies the user when the body has no user_id.
    r = client.post("/exec", json={"lang": "py", "code": LIST, "session_id": sid}, headers={**H, "User-Id": "dave"})
    assert json.loads(r.json()["stdout"]) == ["dave.csv"]
    # A caller with no identity sees no identified user's unlisted upload.
    assert _listing(client, {"session_id": sid}) == []
