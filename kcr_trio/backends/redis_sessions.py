"""Sessions and file metadata in Redis, in KubeCodeRun's exact key schema.

KubeCodeRun and kcr-trio can share one Redis (A/B behind one Service): a session created by one is
found, read, listed and cleaned up by the other. The keys and their encodings are in
:mod:`kcr_trio.backends.redis_schema`.

Deliberate differences from KubeCodeRun, all invisible to it:

* ``get_session`` refreshes ``last_activity`` with a one-key Lua script that only writes when the
  hash still exists and is active. KubeCodeRun's separate ``HSET`` can resurrect a just-expired
  session as a hash holding only ``last_activity``; readers here treat such a hash as missing.
* ``find_entity_session`` checks *all* members of ``entity_sessions:{eid}`` (KubeCodeRun's set
  accumulates ids of TTL-expired sessions and picking one member can pick a dead one), prefers the
  most recently active live session and prunes ids whose hash is gone.
* Multi-key writes use ``MULTI`` in standalone/sentinel mode (atomic) and plain pipelines in cluster
  mode (keys live in different slots), writing the record before adding it to any index, so a
  reader never finds an index entry for a record that does not exist yet.

Client: redis-py's asyncio client (settings, builder and error mapping in
:mod:`kcr_trio.backends.redis_client`), a Trio deadline around every operation through the bridge's
one error-mapping helper. The hot reads (``get_session``, ``get_file``, ``list_files_and_session``)
use the Trio-native client of :mod:`kcr_trio.backends.redis_resp` instead where it applies
(standalone Redis over plain TCP): same commands, same keys, same deadline and error mapping,
without the bridge's per-call cost. No blocking commands are used. Every failure to reach Redis becomes
``errors.Unavailable("Session store unavailable: ...")``.

Cancellation: each public method is one bridged asyncio task; cancelling the caller cancels it and
waits until redis-py has put the connection back (or dropped it, if a reply was half-read), so a
cancelled call never leaks a pool slot or leaves a reply for the next user of the connection.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kcr_trio.backends.redis_client import RedisSettings, open_native, open_redis_client
from kcr_trio.backends.redis_resp import Script
from kcr_trio.backends.redis_schema import (
    EMPTY_SESSION_FIELDS,
    FILES_AND_TOUCH,
    GET_AND_TOUCH,
    file_from_hash,
    iso,
    pairs_to_dict,
    parse_time,
    session_from_hash,
)
from kcr_trio.backends.redis_store_base import RedisStoreBase
from kcr_trio.config import Settings
from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FOREVER, FileRecord, Session, utcnow

# RedisSettings stays importable from here (tests and helpers import it from the store module).
__all__ = ["RedisSessionStore", "RedisSettings", "open_redis_sessions"]

_TOUCH, _FILES = Script.of(GET_AND_TOUCH), Script.of(FILES_AND_TOUCH)
_ENTITY_SCAN_LIMIT = 1000  # members of one entity set examined per lookup


class RedisSessionStore(RedisStoreBase):
    """``SessionStore`` on Redis. Build it with :func:`open_redis_sessions`.

    The records (sessions, entity lookup, file metadata, the listing) are here; the client, keys,
    plumbing, limits, locks, readiness and cleanup support come from
    :class:`~kcr_trio.backends.redis_store_base.RedisStoreBase`."""


    # --- SessionStore ----------------------------------------------------------------------------
    async def create_session(self, *, entity_id: str | None, user_id: str | None) -> Session:
        sid = new_id()
        now = utcnow()
        expires = now + dt.timedelta(seconds=self._ttl) if self._ttl else FOREVER
        metadata: dict[str, Any] = {}
        if entity_id:
            metadata["entity_id"] = entity_id
        if user_id:
            metadata["user_id"] = user_id
        mapping = {
            "session_id": sid,
            "status": "active",
            "created_at": iso(now),
            "last_activity": iso(now),
            "expires_at": iso(expires),
            **EMPTY_SESSION_FIELDS,
            "metadata": json.dumps(metadata),
        }

        async def op() -> None:
            pipe = self._pipeline()
            pipe.hset(self.session_key(sid), mapping=mapping)
            if self._ttl:
                pipe.expire(self.session_key(sid), self._ttl)
            pipe = await self._flush_record_first(pipe)
            pipe.sadd(self.index_key, sid)
            if entity_id:
                pipe.sadd(self.entity_key(entity_id), sid)
            await pipe.execute()

        await self._run(op)
        return Session(sid, "active", now, now, expires, metadata)

    async def get_session(self, session_id: str) -> Session | None:
        now = utcnow()
        flat = await self._script(_TOUCH, self._touch_script, [self.session_key(session_id)], [iso(now)])
        return _live_session(flat, now)

    async def find_entity_session(self, entity_id: str) -> Session | None:
        key = self.entity_key(entity_id)

        async def op() -> list[str]:
            now = utcnow()
            live: list[tuple[dt.datetime, str]] = []
            dead: list[str] = []
            cursor, seen = 0, 0
            while True:
                cursor, members = await self._r.sscan(key, cursor, count=200)
                members = [m for m in members if m]
                if members:
                    pipe = self._r.pipeline(transaction=False)
                    for sid in members:
                        pipe.hmget(self.session_key(sid), "session_id", "status", "expires_at", "last_activity")
                    for sid, (hid, status, expires, last) in zip(members, await pipe.execute(), strict=True):
                        if not hid:
                            dead.append(sid)
                        elif status == "active" and parse_time(expires, FOREVER) > now:
                            live.append((parse_time(last, now), sid))
                seen += len(members)
                if cursor == 0 or seen >= _ENTITY_SCAN_LIMIT:
                    break
            if dead:
                # Ids of sessions whose hash expired or was deleted: KubeCodeRun never removes them.
                await self._r.srem(key, *dead)
            return [sid for _, sid in sorted(live, reverse=True)]

        for sid in await self._run(op):
            session = await self.get_session(sid)  # refreshes last_activity, re-checks liveness
            if session is not None and session.active:
                return session
        return None

    async def add_file(self, record: FileRecord) -> None:
        mapping = {
            "file_id": record.file_id,
            "filename": record.filename,
            "content_type": record.content_type,
            "object_key": record.object_key,
            "session_id": record.session_id,
            "created_at": iso(record.created_at),
            "size": str(record.size),
            "path": record.path,
            "type": record.kind,
        }
        if record.owner:  # our own field; KubeCodeRun reads the hash's known fields only
            mapping["user_id"] = record.owner
        fkey, skey = self.file_key(record.session_id, record.file_id), self.session_files_key(record.session_id)

        async def op() -> None:
            pipe = self._pipeline()
            pipe.hset(fkey, mapping=mapping)
            if self._ttl:
                pipe.expire(fkey, self._ttl)
            pipe = await self._flush_record_first(pipe)
            pipe.sadd(skey, record.file_id)
            if self._ttl:
                pipe.expire(skey, self._ttl)
            await pipe.execute()

        await self._run(op)

    async def get_file(self, session_id: str, file_id: str) -> FileRecord | None:
        key = self.file_key(session_id, file_id)
        if self._native is not None:
            data = pairs_to_dict(await self.redis.run_native(lambda r: r.execute("HGETALL", key)))
        else:
            data = await self._run(lambda: self._r.hgetall(key))
        record = file_from_hash(data or {})
        if record is None or record.session_id != session_id or record.file_id != file_id:
            return None
        return record

    async def list_files(self, session_id: str) -> list[FileRecord]:
        async def op() -> list[dict[str, str]]:
            fids = sorted(await self._r.smembers(self.session_files_key(session_id)))
            if not fids:
                return []
            pipe = self._r.pipeline(transaction=False)
            for fid in fids:
                pipe.hgetall(self.file_key(session_id, fid))
            result: list[dict[str, str]] = await pipe.execute()
            return result

        records = [r for r in map(file_from_hash, await self._run(op)) if r and r.session_id == session_id]
        records.sort(key=lambda r: r.created_at)
        return records

    async def list_files_and_session(self, session_id: str) -> tuple[list[FileRecord], Session | None]:
        """``list_files`` and ``get_session`` (with its refresh) in one script: one round trip and
        one bridged call instead of three and two (see ``redis_schema.FILES_AND_TOUCH``). Cluster
        mode makes the two calls (its keys live in different slots)."""
        if self._cluster:
            return await self.list_files(session_id), await self.get_session(session_id)
        now = utcnow()
        keys = [self.session_key(session_id), self.session_files_key(session_id)]
        args = [iso(now), self.file_key(session_id, "")]
        out = await self._script(_FILES, self._files_script, keys, args)
        hashes = [pairs_to_dict(flat) for flat in out[1:]]
        records = [r for r in map(file_from_hash, hashes) if r and r.session_id == session_id]
        records.sort(key=lambda r: r.file_id)  # list_files' order: member order, then creation time
        records.sort(key=lambda r: r.created_at)
        return records, _live_session(out[0], now)

    async def delete_file(self, session_id: str, file_id: str) -> FileRecord | None:
        async def op() -> dict[str, str]:
            pipe = self._pipeline()
            pipe.hgetall(self.file_key(session_id, file_id))
            pipe.delete(self.file_key(session_id, file_id))
            pipe.srem(self.session_files_key(session_id), file_id)
            record: dict[str, str] = (await pipe.execute())[0]
            return record

        return file_from_hash(await self._run(op) or {})



def _live_session(flat: list[Any] | None, now: dt.datetime) -> Session | None:
    """The session a touch script read (already refreshed when active), unless missing or expired."""
    session = session_from_hash(pairs_to_dict(flat or []))
    if session is None or session.expires_at <= now:
        return None
    if session.status == "active":
        session.last_activity = now
    return session


@asynccontextmanager
async def open_redis_sessions(
    settings: Settings, redis_settings: RedisSettings | None = None
) -> AsyncIterator[RedisSessionStore]:
    """A ``RedisSessionStore`` for the lifetime of the block. Needs the bridge (``open_bridge``).

    Does not connect: a Redis that is down at start-up makes ``ping()`` (readiness) fail and requests
    answer 503 until it comes back; the pool reconnects by itself.
    """
    rs = redis_settings or RedisSettings()
    async with open_redis_client(rs) as (client, cluster), open_native(rs) as native:
        yield RedisSessionStore(
            client,
            prefix=rs.redis_key_prefix,
            ttl_hours=settings.session_ttl_hours,
            cluster=cluster,
            op_timeout=rs.operation_timeout(),
            max_connections=rs.redis_max_connections,
            native=native,
        )
