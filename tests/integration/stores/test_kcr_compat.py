"""Shared state with KubeCodeRun: raw Redis keys and S3 object keys, checked both ways.

Forward: write through kcr-trio, inspect the raw keys with an independent client (redis-py's sync
client, boto3) against KubeCodeRun's layout (kubecoderun-internals.md §4, §5). Reverse: write
records by hand exactly as KubeCodeRun 2.1.3/3.x does and read, list and download them through
kcr-trio.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator

import pytest
import redis
import trio

from kcr_trio.backends.redis_sessions import open_redis_sessions
from kcr_trio.backends.s3_files import open_s3_files
from kcr_trio.config import Settings
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FileRecord, utcnow
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.s3_server import S3Server, unique_bucket

SESSION_FIELDS = {
    "session_id", "status", "created_at", "last_activity", "expires_at", "pod_name", "pod_status",
    "files", "working_directory", "memory_usage_mb", "cpu_usage_percent", "metadata",
}
FILE_FIELDS = {"file_id", "filename", "content_type", "object_key", "session_id", "created_at", "size", "path", "type"}


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def iso_utc(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    assert value.endswith("+00:00"), value
    return parsed


async def test_session_hash_matches_kcr_layout(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id="ent-1", user_id="user-1")
    h = raw.hgetall(f"{p}sessions:{s.session_id}")
    assert set(h) == SESSION_FIELDS
    assert h["session_id"] == s.session_id and h["status"] == "active"
    assert h["expires_at"] == "9999-12-31T23:59:59+00:00"  # SESSION_TTL_HOURS=0
    assert iso_utc(h["created_at"]) == s.created_at
    iso_utc(h["last_activity"])
    assert (h["pod_name"], h["pod_status"], h["files"], h["working_directory"]) == ("", "", "{}", "/mnt/data")
    assert (h["memory_usage_mb"], h["cpu_usage_percent"]) == ("", "")
    assert json.loads(h["metadata"]) == {"entity_id": "ent-1", "user_id": "user-1"}
    assert raw.ttl(f"{p}sessions:{s.session_id}") == -1  # no expiry
    assert raw.sismember(f"{p}sessions:index", s.session_id)
    assert raw.smembers(f"{p}entity_sessions:ent-1") == {s.session_id}
    assert raw.ttl(f"{p}entity_sessions:ent-1") == -1

    anonymous = await redis_store.create_session(entity_id=None, user_id=None)
    assert raw.hget(f"{p}sessions:{anonymous.session_id}", "metadata") == "{}"


async def test_every_key_carries_the_prefix(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id="ent-p", user_id=None)
    await redis_store.add_file(_record(s.session_id, "f-prefix", "upload"))
    await redis_store.hit("ip:127.0.0.1", 60)
    await redis_store.get_session(s.session_id)
    await redis_store.find_entity_session("ent-p")
    keys = set(raw.scan_iter(match=f"{p}*"))
    assert {
        f"{p}sessions:{s.session_id}", f"{p}sessions:index", f"{p}entity_sessions:ent-p",
        f"{p}files:{s.session_id}:f-prefix", f"{p}session_files:{s.session_id}",
    } <= keys
    assert not [k for k in raw.scan_iter(match=f"*{s.session_id}*") if not k.startswith(p)]


async def test_ttl_semantics_when_configured(bridge, redis_server: RedisServer, raw: redis.Redis) -> None:
    settings = Settings(session_ttl_hours=2)
    async with open_redis_sessions(settings, redis_server.settings(unique_prefix())) as store:
        p = store.prefix
        before = utcnow()
        s = await store.create_session(entity_id="ent-ttl", user_id=None)
        h = raw.hgetall(f"{p}sessions:{s.session_id}")
        expires = iso_utc(h["expires_at"])
        assert dt.timedelta(hours=2) <= expires - before < dt.timedelta(hours=2, seconds=5)
        assert 7190 <= raw.ttl(f"{p}sessions:{s.session_id}") <= 7200
        assert raw.ttl(f"{p}sessions:index") == -1 and raw.ttl(f"{p}entity_sessions:ent-ttl") == -1
        # Reading does not extend the session (KubeCodeRun sets the TTL once).
        raw.expire(f"{p}sessions:{s.session_id}", 100)
        await store.get_session(s.session_id)
        assert raw.ttl(f"{p}sessions:{s.session_id}") <= 100
        # File metadata gets the full TTL on every store.
        await store.add_file(_record(s.session_id, "f-ttl", "output"))
        assert 7190 <= raw.ttl(f"{p}files:{s.session_id}:f-ttl") <= 7200
        assert 7190 <= raw.ttl(f"{p}session_files:{s.session_id}") <= 7200


async def test_file_hash_matches_kcr_layout(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id=None, user_id=None)
    up = _record(s.session_id, "f-up", "upload", name="report.csv", content_type="text/csv", size=1234)
    out = _record(s.session_id, "f-out", "output", name="plot.png", size=20480)
    await redis_store.add_file(up)
    await redis_store.add_file(out)
    h = raw.hgetall(f"{p}files:{s.session_id}:f-up")
    assert set(h) == FILE_FIELDS
    assert h == {
        "file_id": "f-up", "filename": "report.csv", "content_type": "text/csv",
        "object_key": f"sessions/{s.session_id}/uploads/f-up", "session_id": s.session_id,
        "created_at": up.created_at.isoformat(), "size": "1234", "path": "/report.csv", "type": "upload",
    }
    h = raw.hgetall(f"{p}files:{s.session_id}:f-out")
    assert (h["object_key"], h["path"], h["type"], h["size"]) == (
        f"sessions/{s.session_id}/outputs/f-out", "/outputs/plot.png", "output", "20480",
    )
    iso_utc(h["created_at"])
    assert raw.smembers(f"{p}session_files:{s.session_id}") == {"f-up", "f-out"}
    assert raw.ttl(f"{p}files:{s.session_id}:f-up") == -1


async def test_records_written_by_kcr_are_read_listed_and_downloaded(
    bridge, redis_server: RedisServer, s3_server: S3Server, raw: redis.Redis
) -> None:
    """The reverse direction, in KubeCodeRun's default layout: no key prefix, default bucket."""
    settings = Settings(session_ttl_hours=0)
    sid, eid = new_id(), f"ent-{new_id()}"
    now = dt.datetime.now(dt.UTC)
    # sessions:{sid} exactly as K@2.1.3 create_session writes it (model_dump + MULTI), 24 h TTL.
    raw.hset(f"sessions:{sid}", mapping={
        "session_id": sid, "status": "active", "created_at": now.isoformat(),
        "last_activity": now.isoformat(), "expires_at": (now + dt.timedelta(hours=24)).isoformat(),
        "pod_name": "", "pod_status": "", "files": "{}", "working_directory": "/mnt/data",
        "memory_usage_mb": "", "cpu_usage_percent": "", "metadata": json.dumps({"entity_id": eid}),
    })
    raw.expire(f"sessions:{sid}", 86400)
    raw.sadd("sessions:index", sid)
    raw.sadd(f"entity_sessions:{eid}", sid)
    # An upload (store_uploaded_file), an output (store_execution_output_file) and a record from
    # the presigned-upload path, which has no "type" field.
    files = {
        "upl": ("data file.csv", "text/csv", "uploads", b"a,b\n1,2\n", "upload", "/data file.csv"),
        "out": ("plot.png", "application/octet-stream", "outputs", os.urandom(70_000), "output", "/outputs/plot.png"),
        "pre": ("notes.txt", "text/plain", "uploads", b"presigned", None, "/notes.txt"),
    }
    s3 = s3_server.client()
    bucket = "kubecoderun-files"
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for i, (tag, (name, ctype, folder, body, kind, path)) in enumerate(files.items()):
        fid = f"{tag}-{new_id()}"
        files[tag] = (name, ctype, folder, body, kind, path, fid)  # type: ignore[assignment]
        key = f"sessions/{sid}/{folder}/{fid}"
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype)
        meta = {
            "file_id": fid, "filename": name, "content_type": ctype, "object_key": key, "session_id": sid,
            "created_at": (now + dt.timedelta(seconds=i)).isoformat(), "size": str(len(body)), "path": path,
        }
        if kind:
            meta["type"] = kind
        raw.hset(f"files:{sid}:{fid}", mapping=meta)
        raw.sadd(f"session_files:{sid}", fid)
        raw.expire(f"files:{sid}:{fid}", 86400)

    async with open_redis_sessions(settings, redis_server.settings("")) as store, open_s3_files(
        settings, s3_server.settings()
    ) as blobs:
        session = await store.get_session(sid)
        assert session is not None and session.active and session.metadata == {"entity_id": eid}
        assert raw.ttl(f"sessions:{sid}") > 86000  # still KubeCodeRun's TTL
        found = await store.find_entity_session(eid)
        assert found is not None and found.session_id == sid

        listed = await store.list_files(sid)
        assert [r.filename for r in listed] == ["data file.csv", "plot.png", "notes.txt"]
        assert [r.kind for r in listed] == ["upload", "output", "upload"]
        for r in listed:
            name, ctype, folder, body, kind, path, fid = files[r.file_id.split("-", 1)[0]]  # type: ignore[misc]
            assert (r.file_id, r.size, r.content_type, r.path) == (fid, len(body), ctype, path)
            assert r.object_key == f"sessions/{sid}/{folder}/{fid}"
            async with blobs.open(r.object_key) as stream:
                assert b"".join([c async for c in stream]) == body
        single = await store.get_file(sid, files["out"][6])  # type: ignore[index]
        assert single is not None and single.kind == "output"
        # /files?detail=summary's one script reads the same records and the same session.
        before = set(raw.keys("*"))
        both, touched = await store.list_files_and_session(sid)
        assert both == listed
        assert touched is not None and touched.active and touched.metadata == {"entity_id": eid}
        assert iso_utc(raw.hget(f"sessions:{sid}", "last_activity")) == touched.last_activity
        assert raw.ttl(f"sessions:{sid}") > 86000 and set(raw.keys("*")) == before


async def test_get_session_never_resurrects_an_expired_hash(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id=None, user_id=None)
    raw.delete(f"{p}sessions:{s.session_id}")  # what a TTL expiry does
    assert await redis_store.get_session(s.session_id) is None
    assert raw.exists(f"{p}sessions:{s.session_id}") == 0
    # A half hash left behind by KubeCodeRun's HSET-after-expiry race is not a session.
    raw.hset(f"{p}sessions:ghost", "last_activity", utcnow().isoformat())
    assert await redis_store.get_session("ghost") is None


async def test_inactive_sessions_are_not_touched(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id=None, user_id=None)
    raw.hset(f"{p}sessions:{s.session_id}", mapping={"status": "terminated", "last_activity": "2020-01-01T00:00:00+00:00"})
    got = await redis_store.get_session(s.session_id)
    assert got is not None and got.status == "terminated" and not got.active
    assert raw.hget(f"{p}sessions:{s.session_id}", "last_activity") == "2020-01-01T00:00:00+00:00"


async def test_files_and_session_script_keeps_the_touch_rules(redis_store, raw: redis.Redis) -> None:
    """The one-call listing writes only ``last_activity``, only on an active session, and never
    brings back a hash that expired (GET_AND_TOUCH's rules)."""
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id=None, user_id=None)
    await redis_store.add_file(_record(s.session_id, new_id(), "upload"))
    raw.hset(f"{p}sessions:{s.session_id}", mapping={"status": "terminated", "last_activity": "2020-01-01T00:00:00+00:00"})
    files, got = await redis_store.list_files_and_session(s.session_id)
    assert len(files) == 1 and got is not None and not got.active
    assert raw.hget(f"{p}sessions:{s.session_id}", "last_activity") == "2020-01-01T00:00:00+00:00"
    raw.delete(f"{p}sessions:{s.session_id}")  # what a TTL expiry does
    files, got = await redis_store.list_files_and_session(s.session_id)
    assert len(files) == 1 and got is None  # the files' own keys outlive it, as with list_files
    assert raw.exists(f"{p}sessions:{s.session_id}") == 0


async def test_session_past_expires_at_is_gone(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    s = await redis_store.create_session(entity_id=None, user_id=None)
    raw.hset(f"{p}sessions:{s.session_id}", "expires_at", "2020-01-01T00:00:00+00:00")
    assert await redis_store.get_session(s.session_id) is None


async def test_find_entity_session_checks_every_member(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    eid = "ent-many"
    live = await redis_store.create_session(entity_id=eid, user_id=None)
    dead_ids = []
    for _ in range(30):  # KubeCodeRun's set accumulates ids of sessions that expired by TTL
        d = await redis_store.create_session(entity_id=eid, user_id=None)
        raw.delete(f"{p}sessions:{d.session_id}")
        dead_ids.append(d.session_id)
    terminated = await redis_store.create_session(entity_id=eid, user_id=None)
    raw.hset(f"{p}sessions:{terminated.session_id}", "status", "terminated")
    expired = await redis_store.create_session(entity_id=eid, user_id=None)
    raw.hset(f"{p}sessions:{expired.session_id}", "expires_at", "2020-01-01T00:00:00+00:00")

    found = await redis_store.find_entity_session(eid)
    assert found is not None and found.session_id == live.session_id
    members = raw.smembers(f"{p}entity_sessions:{eid}")
    assert not members & set(dead_ids)  # ids without a hash were pruned ...
    assert {live.session_id, terminated.session_id, expired.session_id} <= members  # ... nothing else

    raw.delete(f"{p}sessions:{live.session_id}")
    assert await redis_store.find_entity_session(eid) is None


async def test_find_entity_session_prefers_the_most_recently_active(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    old = await redis_store.create_session(entity_id="ent-recent", user_id=None)
    new = await redis_store.create_session(entity_id="ent-recent", user_id=None)
    raw.hset(f"{p}sessions:{old.session_id}", "last_activity", "2030-01-01T00:00:00+00:00")
    found = await redis_store.find_entity_session("ent-recent")
    assert found is not None and found.session_id == old.session_id
    assert new.session_id != old.session_id


async def test_rate_limit_counter_layout(redis_store, raw: redis.Redis) -> None:
    p = redis_store.prefix
    assert await redis_store.hit("key:abc", 60) == 1
    keys = list(raw.scan_iter(match=f"{p}kcr:rl:key:abc:*"))
    assert len(keys) == 1
    assert 0 < raw.ttl(keys[0]) <= 61 and raw.get(keys[0]) == "1"


async def test_objects_use_kcr_keys_in_the_default_bucket(bridge, s3_server: S3Server) -> None:
    settings = Settings()
    sid = new_id()
    up, out = _record(sid, new_id(), "upload"), _record(sid, new_id(), "output")
    async with open_s3_files(settings, s3_server.settings()) as blobs:
        assert blobs.bucket == "kubecoderun-files"
        await blobs.put(up.object_key, _chunks(b"upload bytes"), content_type="text/csv")
        await blobs.put(out.object_key, _chunks(b"output bytes"), content_type="application/octet-stream")
    keys = s3_server.list_keys("kubecoderun-files", prefix=f"sessions/{sid}/")
    assert keys == sorted([f"sessions/{sid}/uploads/{up.file_id}", f"sessions/{sid}/outputs/{out.file_id}"])
    head = s3_server.client().head_object(Bucket="kubecoderun-files", Key=up.object_key)
    assert head["ContentType"] == "text/csv" and head["ContentLength"] == len(b"upload bytes")
    body = s3_server.client().get_object(Bucket="kubecoderun-files", Key=out.object_key)["Body"].read()
    assert body == b"output bytes"


async def test_bucket_is_created_only_when_allowed(bridge, s3_server: S3Server) -> None:
    from kcr_trio.core.errors import Unavailable

    bucket = unique_bucket()
    async with open_s3_files(Settings(), s3_server.settings(bucket, kcr_minio_create_bucket=False)) as blobs:
        with pytest.raises(Unavailable, match="does not exist"):
            await blobs.ping()
        with pytest.raises(Unavailable):
            await blobs.put("sessions/x/uploads/y", _chunks(b"z"), content_type="text/plain")
    assert bucket not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    async with open_s3_files(Settings(), s3_server.settings(bucket)) as blobs:
        await blobs.ping()
    assert bucket in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


def _record(
    sid: str, fid: str, kind: str, *, name: str = "f.bin", content_type: str = "application/octet-stream", size: int = 1
) -> FileRecord:
    return FileRecord(
        session_id=sid, file_id=fid, filename=name, content_type=content_type, size=size,
        created_at=utcnow(), kind=kind,  # type: ignore[arg-type]
    )


async def _chunks(*parts: bytes):
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
async def test_cluster_and_sentinel_modes_write_the_same_layout(bridge, request, mode: str) -> None:
    """REDIS_MODE=cluster (keys spread over slots, no MULTI) and sentinel write the same records."""
    servers = request.getfixturevalue("redis_cluster" if mode == "cluster" else "redis_sentinel")
    prefix = unique_prefix()
    async with open_redis_sessions(Settings(session_ttl_hours=1), servers.settings(prefix)) as store:
        s = await store.create_session(entity_id="ent-mode", user_id="u")
        await store.add_file(_record(s.session_id, "f-mode", "output", name="o.txt"))
        assert (await store.ping())["mode"] == ("cluster" if mode == "cluster" else "standalone/sentinel")
    if mode == "cluster":
        host, port = servers.nodes.split(",")[0].split(":")
        client = redis.RedisCluster(host=host, port=int(port), decode_responses=True)
    else:
        client = redis.Redis(host="127.0.0.1", port=servers.master.port, decode_responses=True)
    try:
        assert set(client.hgetall(f"{prefix}sessions:{s.session_id}")) == SESSION_FIELDS
        assert 3590 <= client.ttl(f"{prefix}sessions:{s.session_id}") <= 3600
        assert client.sismember(f"{prefix}sessions:index", s.session_id)
        assert client.smembers(f"{prefix}entity_sessions:ent-mode") == {s.session_id}
        h = client.hgetall(f"{prefix}files:{s.session_id}:f-mode")
        assert set(h) == FILE_FIELDS and h["path"] == "/outputs/o.txt"
        assert client.smembers(f"{prefix}session_files:{s.session_id}") == {"f-mode"}
        if mode == "cluster":  # the keys really live on different nodes
            slots = {client.keyslot(k) for k in (f"{prefix}sessions:{s.session_id}", f"{prefix}sessions:index",
                                                   f"{prefix}entity_sessions:ent-mode")}
            assert len(slots) == 3
    finally:
        client.close()
