"""KubeCodeRun's Redis key schema and encodings, shared by both servers (A/B on one Redis).

Keys (all behind ``REDIS_KEY_PREFIX``, which is concatenated as is, e.g. ``"kcr:"``)::

    sessions:{sid}          HASH  session_id status created_at last_activity expires_at pod_name
                                  pod_status files working_directory memory_usage_mb
                                  cpu_usage_percent metadata      TTL = SESSION_TTL_HOURS, none if 0
    sessions:index          SET   session ids                      no TTL
    entity_sessions:{eid}   SET   session ids                      no TTL
    files:{sid}:{fid}       HASH  file_id filename content_type object_key session_id created_at
                                  size path type [user_id]         TTL re-applied on every store
    session_files:{sid}     SET   file ids                         same
    kcr:rl:{key}:{window}   STRING counter for ``hit()`` (our own; KubeCodeRun never reads it)

Encodings: UTF-8 strings; timestamps ``datetime.isoformat()`` in UTC (``...+00:00``); ``None`` is
``""``; dicts are JSON; with ``SESSION_TTL_HOURS=0`` sessions get no TTL and ``expires_at`` =
``9999-12-31T23:59:59+00:00``.

Pure functions and constants only: reading and writing these encodings is the store's job
(:mod:`kcr_trio.backends.redis_sessions`); a session or file written by either server reads back
the same through :func:`session_from_hash` / :func:`file_from_hash`.
"""

from __future__ import annotations

import datetime as dt
import json

from kcr_trio.core.model import FOREVER, FileRecord, Session, utcnow

__all__ = [
    "EMPTY_SESSION_FIELDS", "FILES_AND_TOUCH", "GET_AND_TOUCH", "UNLOCK", "file_from_hash", "iso", "pairs_to_dict", "parse_time",
    "session_from_hash",
]

# Session hash fields KubeCodeRun writes, in its order, with its defaults.
EMPTY_SESSION_FIELDS = {
    "pod_name": "",
    "pod_status": "",
    "files": "{}",
    "working_directory": "/mnt/data",
    "memory_usage_mb": "",
    "cpu_usage_percent": "",
}

# Release a lock only if its value is still our owner token (a lapsed lock may be someone else's now).
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Read a session and, only if it exists and is active, refresh last_activity: one round trip, and
# never creates a hash (HSET on a key that just expired would).
_READ_AND_TOUCH_SESSION = """
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if h[i] == 'status' then
    if h[i + 1] == 'active' then
      redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
    end
    break
  end
end
"""
GET_AND_TOUCH = _READ_AND_TOUCH_SESSION + "return h\n"

# ``/files?detail=summary`` (LibreChat's priming call) needs a session's files and its session:
# GET_AND_TOUCH on KEYS[1] (``sessions:{sid}``), then SMEMBERS of KEYS[2] (``session_files:{sid}``)
# and HGETALL of ``ARGV[2] .. fid`` (``files:{sid}:{fid}``) for each member. One round trip instead
# of three, and one bridged call instead of two: redis-py through the bridge was ~30 % of a
# ``/files`` request's CPU. Reads the same keys as the separate calls and writes only
# ``last_activity``, exactly as GET_AND_TOUCH does. The file keys are built inside the script, so
# this runs only where all keys live on one server (standalone, sentinel), never in cluster mode.
FILES_AND_TOUCH = _READ_AND_TOUCH_SESSION + """
local out = {h}
local fids = redis.call('SMEMBERS', KEYS[2])
for i = 1, #fids do
  out[i + 1] = redis.call('HGETALL', ARGV[2] .. fids[i])
end
return out
"""


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


def parse_time(value: str | None, default: dt.datetime) -> dt.datetime:
    if not value:
        return default
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return default
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def session_from_hash(data: dict[str, str]) -> Session | None:
    """A ``Session`` from a ``sessions:{sid}`` hash, or ``None`` for a hash that is not a session
    (for example one holding only ``last_activity``)."""
    sid, status = data.get("session_id"), data.get("status")
    if not sid or status not in ("active", "idle", "terminated", "error"):
        return None
    now = utcnow()
    try:
        metadata = json.loads(data.get("metadata") or "{}")
    except ValueError:
        metadata = {}
    created = parse_time(data.get("created_at"), now)
    return Session(
        session_id=sid,
        status=status,  # type: ignore[arg-type]
        created_at=created,
        last_activity=parse_time(data.get("last_activity"), created),
        expires_at=parse_time(data.get("expires_at"), FOREVER),
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def file_from_hash(data: dict[str, str]) -> FileRecord | None:
    sid, fid = data.get("session_id"), data.get("file_id")
    if not sid or not fid:
        return None
    kind = data.get("type")
    if kind not in ("upload", "output"):
        # Presigned-upload records have no type: tell by where the bytes live.
        kind = "output" if "/outputs/" in data.get("object_key", "") else "upload"
    try:
        size = int(data.get("size") or 0)
    except ValueError:
        size = 0
    return FileRecord(
        session_id=sid,
        file_id=fid,
        filename=data.get("filename") or fid,
        content_type=data.get("content_type") or "application/octet-stream",
        size=size,
        created_at=parse_time(data.get("created_at"), utcnow()),
        kind=kind,  # type: ignore[arg-type]
        owner=data.get("user_id") or None,
    )


def pairs_to_dict(flat: list[str]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
