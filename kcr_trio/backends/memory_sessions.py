"""In-process session and file-metadata store: the embedded default and the Redis store's twin.

It keeps KubeCodeRun's semantics (TTL set once at creation, ``0`` = never expires, reading an active
session refreshes ``last_activity``) so tests written against it hold for Redis too. Nothing here
awaits anything that can block, so every method is trivially cancellation-safe; the ``await
trio.lowlevel.checkpoint()`` calls keep them honest async functions (they can be cancelled like the
real thing).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import trio

from kcr_trio.core.ids import new_id
from kcr_trio.core.model import FOREVER, FileRecord, Session, utcnow


class MemorySessionStore:
    def __init__(self, *, ttl_hours: int = 0) -> None:
        self._ttl = dt.timedelta(hours=ttl_hours) if ttl_hours else None
        self._sessions: dict[str, Session] = {}
        self._entities: dict[str, list[str]] = {}
        self._files: dict[str, dict[str, FileRecord]] = {}
        self._counters: dict[str, tuple[int, int]] = {}  # key -> (window index, count)
        self._locks: dict[str, tuple[str, float]] = {}  # key -> (owner, monotonic expiry)

    async def create_session(self, *, entity_id: str | None, user_id: str | None) -> Session:
        await trio.lowlevel.checkpoint()
        now = utcnow()
        meta: dict[str, Any] = {}
        if entity_id:
            meta["entity_id"] = entity_id
        if user_id:
            meta["user_id"] = user_id
        session = Session(
            session_id=new_id(),
            status="active",
            created_at=now,
            last_activity=now,
            expires_at=now + self._ttl if self._ttl else FOREVER,
            metadata=meta,
        )
        self._sessions[session.session_id] = session
        if entity_id:
            self._entities.setdefault(entity_id, []).append(session.session_id)
        return session

    def _live(self, session_id: str) -> Session | None:
        """The session unless it expired. Expired ones stay (invisible) until the clean-up loop
        has removed their bytes and calls ``forget_session``, as with Redis."""
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= utcnow():
            return None
        return session

    async def get_session(self, session_id: str) -> Session | None:
        await trio.lowlevel.checkpoint()
        session = self._live(session_id)
        if session is not None and session.status == "active":
            session.last_activity = utcnow()
        return session

    async def find_entity_session(self, entity_id: str) -> Session | None:
        await trio.lowlevel.checkpoint()
        ids = self._entities.get(entity_id, [])
        # Newest first: the session an entity used last is the one its files most likely live in.
        for sid in reversed(ids):
            session = self._live(sid)
            if session is not None and session.status == "active":
                session.last_activity = utcnow()
                return session
        self._entities[entity_id] = [sid for sid in ids if sid in self._sessions]
        return None

    async def add_file(self, record: FileRecord) -> None:
        await trio.lowlevel.checkpoint()
        self._files.setdefault(record.session_id, {})[record.file_id] = record

    async def get_file(self, session_id: str, file_id: str) -> FileRecord | None:
        await trio.lowlevel.checkpoint()
        if session_id in self._sessions and self._live(session_id) is None:
            return None
        return self._files.get(session_id, {}).get(file_id)

    async def list_files(self, session_id: str) -> list[FileRecord]:
        await trio.lowlevel.checkpoint()
        if session_id in self._sessions and self._live(session_id) is None:
            return []
        return sorted(self._files.get(session_id, {}).values(), key=lambda r: r.created_at)

    async def list_files_and_session(self, session_id: str) -> tuple[list[FileRecord], Session | None]:
        return await self.list_files(session_id), await self.get_session(session_id)

    async def delete_file(self, session_id: str, file_id: str) -> FileRecord | None:
        await trio.lowlevel.checkpoint()
        return self._files.get(session_id, {}).pop(file_id, None)

    async def hit(self, key: str, window_seconds: int) -> int:
        await trio.lowlevel.checkpoint()
        window = int(time.time() // window_seconds)
        current, count = self._counters.get(key, (window, 0))
        count = count + 1 if current == window else 1
        self._counters[key] = (window, count)
        if len(self._counters) > 100_000:  # bound memory: drop windows that are over
            self._counters = {k: v for k, v in self._counters.items() if v[0] >= window}
        return count

    async def try_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        await trio.lowlevel.checkpoint()
        now = time.monotonic()
        held = self._locks.get(key)
        if held is not None and held[1] > now and held[0] != owner:
            return False
        self._locks[key] = (owner, now + ttl_seconds)
        return True

    async def unlock(self, key: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._locks.get(key, ("", 0.0))[0] == owner:
            del self._locks[key]

    async def expired_sessions(self) -> list[str]:
        """Ids of sessions past their expiry (for the cleanup loop)."""
        await trio.lowlevel.checkpoint()
        now = utcnow()
        return [sid for sid, s in self._sessions.items() if s.expires_at <= now]

    async def forget_session(self, session_id: str) -> None:
        """Drop the session record and its file metadata (the clean-up loop's last step)."""
        await trio.lowlevel.checkpoint()
        session = self._sessions.pop(session_id, None)
        self._files.pop(session_id, None)
        entity = session.metadata.get("entity_id") if session is not None else None
        if entity and entity in self._entities:
            self._entities[entity] = [sid for sid in self._entities[entity] if sid != session_id]

    async def ping(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"backend": "memory", "sessions": len(self._sessions)}
