"""Findings 7, 8 and 9 against a real redis-server and a real S3 server (moto), killed mid-flight.

* 7: the session store dies after the heartbeat committed a 200: the program's output is kept, the
  store failure is reported in ``stderr``, and no output bytes are left without metadata.
* 8: ``DELETE`` during an S3 outage: either it completes or the file stays listed (never half-done).
* 9: objects without metadata (a cancelled upload's late PUT, an output stored during a Redis
  outage) are swept once past their age, even with ``SESSION_TTL_HOURS=0``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.redis_server import RedisServer, running_redis
from tests.support.s3_server import S3Server, running_s3
from tests.support.server import TEST_KEY, ServerProcess, server_process, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
H = {"X-API-Key": TEST_KEY}
BUCKET = "outages"


@dataclass
class Stack:
    server: ServerProcess
    redis: RedisServer
    s3: S3Server

    def stored_keys(self, prefix: str = "sessions/") -> list[str]:
        return self.s3.list_keys(BUCKET, prefix)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_redis() as redis, running_s3() as s3:
        env = {
            **redis.env(prefix="out:"),
            **s3.env(bucket=BUCKET),
            "MAX_EXECUTION_TIME": "10",
            "POD_POOL_PY": "1",
            "POD_POOL_JS": "0",
            "POD_POOL_BASH": "0",
            "KCR_HEARTBEAT_GRACE": "0.5",
            "KCR_ORPHAN_SWEEP_INTERVAL": "0.5",
            "KCR_ORPHAN_MIN_AGE": "2",
        }
        with server_process(env) as server:
            yield Stack(server, redis, s3)


@pytest.fixture
def live(stack: Stack) -> Iterator[Stack]:
    """Both stores up before and after each test (an outage test may leave one down)."""
    stack.redis.start()
    stack.s3.start()
    yield stack
    stack.redis.start()
    stack.s3.start()


def test_output_is_kept_when_the_session_store_dies_after_the_commit(live: Stack) -> None:
    code = "print('hello', flush=True)\nopen('out.txt', 'w').write('o')\nimport time\ntime.sleep(3)\nprint('bye')"
    with httpx.Client(timeout=60) as client, \
            client.stream("POST", live.server.url + "/exec", json={"lang": "py", "code": code}, headers=H) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        first = next(chunks)
        assert first.startswith(b" ")  # the heartbeat committed the 200: the run is under way
        live.redis.kill()
        body = json.loads(first + b"".join(chunks))
    assert body["stdout"] == "hello\nbye\n"
    assert body["session_id"] and body["files"] == []
    assert "out.txt" in body["stderr"] and "not saved" in body["stderr"]
    # The output's bytes went with it: nothing is left in S3 without metadata.
    assert [k for k in live.stored_keys() if "/outputs/" in k] == []


def _upload(stack: Stack, name: str, data: bytes) -> tuple[str, str]:
    r = httpx.post(stack.server.url + "/upload", files={"file": (name, data)}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["session_id"], r.json()["files"][0]["fileId"]


def _listed(stack: Stack, sid: str) -> list[str]:
    r = httpx.get(stack.server.url + f"/files/{sid}", headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()]


def test_delete_during_an_s3_outage_is_not_half_applied(live: Stack) -> None:
    sid, fid = _upload(live, "keep.txt", b"k")
    live.s3.stop()
    r = httpx.delete(live.server.url + f"/files/{sid}/{fid}", headers=H, timeout=60)
    assert r.status_code == 503
    assert _listed(live, sid) == [fid]  # nothing changed: the user may retry
    live.s3.start()  # (moto keeps nothing across a restart: the bucket comes back empty)
    r = httpx.delete(live.server.url + f"/files/{sid}/{fid}", headers=H, timeout=60)
    assert r.status_code == 200 and _listed(live, sid) == []


def test_objects_without_metadata_are_swept(live: Stack) -> None:
    sid, fid = _upload(live, "kept.txt", b"kept")
    client = live.s3.client()
    orphan = "sessions/AAAAAAAAAAAAAAAAAAAAA/uploads/BBBBBBBBBBBBBBBBBBBBB"
    foreign = ["states/AAAAAAAAAAAAAAAAAAAAA/state.dat", "health_check/test_1.txt"]
    for key in [orphan, *foreign]:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    # Past KCR_ORPHAN_MIN_AGE (2 s) the orphan goes; the upload (older still) and keys outside our
    # layout stay.
    wait_until(lambda: orphan not in live.stored_keys(), 30, interval=0.2, message="orphan swept")
    assert f"sessions/{sid}/uploads/{fid}" in live.stored_keys()
    assert all(key in live.s3.list_keys(BUCKET) for key in foreign)
    r = httpx.get(live.server.url + f"/download/{sid}/{fid}", headers=H, timeout=30)
    assert r.status_code == 200 and r.content == b"kept"


def _cancelled_upload(stack: Stack, size: int) -> None:
    """A client that sends half of a large multipart upload, then leaves (its socket closes)."""
    host, port = stack.server.url.removeprefix("http://").rsplit(":", 1)
    boundary = "cancelledboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"gone.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    total = len(head) + size + len(f"\r\n--{boundary}--\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            (f"POST /upload HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {TEST_KEY}\r\n"
             f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode()
            + head
        )
        sock.sendall(b"x" * (size // 2))


def test_no_orphan_and_no_half_visible_file_after_outages(live: Stack) -> None:
    """After cancelled uploads, an S3 outage and a Redis outage during uploads and runs, every
    object has metadata and every listed file has its bytes, once the sweeper has run past the age."""
    live.s3.stop()
    r = httpx.post(live.server.url + "/upload", files={"file": ("s3down.txt", b"s")}, headers=H, timeout=60)
    assert r.status_code == 503
    live.s3.start()  # (moto comes back empty)
    for _ in range(3):
        _cancelled_upload(live, 4 * 2**20)
    sid, _ = _upload(live, "before.txt", b"b")
    live.redis.kill()
    code = "open('made.txt', 'w').write('m')\nprint('ran')"
    r = httpx.post(live.server.url + "/exec", headers=H, timeout=60,
                   json={"lang": "py", "code": code, "session_id": sid})
    assert r.status_code in (200, 503)
    r = httpx.post(live.server.url + "/upload", files={"file": ("during.txt", b"d")}, headers=H, timeout=30)
    assert r.status_code == 503
    live.redis.start()  # (no persistence: the metadata written before the outage is gone too)
    sid2, fid2 = _upload(live, "after.txt", b"a")

    def consistent() -> bool:
        keys = live.stored_keys()
        return keys == [f"sessions/{sid2}/uploads/{fid2}"]

    wait_until(consistent, 30, interval=0.2, message="only objects with metadata remain")
    r = httpx.get(live.server.url + f"/download/{sid2}/{fid2}", headers=H, timeout=30)
    assert r.status_code == 200 and r.content == b"a"
