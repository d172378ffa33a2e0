"""The ``stateful`` execution profile: runtime sessions with a durable ``/mnt/data`` (contract §3.2).

LibreChat's stateful agents promise the model "filesystem-tier" persistence: the calls of one
runtime session see one ``/mnt/data`` holding what earlier calls wrote and without what they
deleted, while every call is still a fresh process (no variables or background processes survive).
The official server gets this from VM affinity. We get it without affinity, so it works across
replicas and in an A/B deployment:

* **Where.** The workspace lives in the configured file store: one object per file
  (``runtime/<id>/files/<fid>``) and a manifest (``runtime/<id>/manifest.json``) naming them. A
  manifest is replaced atomically (``FileStore.put``), so a reader sees the old or the new
  workspace, never a mix. Objects a new manifest no longer names are deleted after it is written.
* **Who.** ``runtime_session_id`` = ``rt_`` + 40 hex of sha256(principal, hint), the official
  derivation's shape: the hint partitions only within one principal, so it is never a security
  boundary (another caller's hint names another workspace).
* **One call at a time.** Concurrent calls of one runtime session are serialised by a lock in the
  session store (``SessionStore.try_lock``; Redis when replicas share it), polled with a deadline;
  a call that cannot get it in time gets 409 ``runtime_session_busy``, like the official server's
  affinity mode. The lock lapses on its own if a replica dies holding it.
* **Limits.** Total bytes and file count per workspace (files that do not fit are not kept, and the
  response says so in ``artifact_delivery`` and ``stderr``), and a TTL after the last call: an
  expired workspace is started afresh (``runtime_status: "new"``) and its objects are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from .errors import ApiError, BadRequest, NotFound, TooLarge
from .files import CLEANUP_TIMEOUT  # the same bound on shielded clean-up as every file write
from .ids import new_id
from .interfaces import FileStore, Sandbox, SessionStore

log = logging.getLogger("kcr_trio.runtime")

HINT_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LOCK_POLL_MIN, LOCK_POLL_MAX = 0.05, 0.5


@dataclass(frozen=True, slots=True)
class RuntimeLimits:
    ttl_seconds: float
    max_bytes: int
    max_files: int
    lock_wait: float  # how long a call waits for another call of the same session to finish
    lock_ttl: float  # how long a held lock lasts if its holder disappears


def validate_hint(hint: Any) -> str:
    """The official rule: at most 128 characters of ``[A-Za-z0-9._:-]``; anything else is 400."""
    if not isinstance(hint, str) or not HINT_PATTERN.match(hint):
        raise BadRequest(
            "runtime_session_hint must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            details=[{"field": "body -> runtime_session_hint", "message": "Invalid runtime session hint",
                      "code": "invalid_runtime_session_hint"}],
        )
    return hint


def runtime_session_id(principal: str, hint: str) -> str:
    digest = hashlib.sha256(f"{len(principal)}:{principal}\0{hint}".encode()).hexdigest()
    return "rt_" + digest[:40]


@dataclass(slots=True)
class WorkspaceFile:
    key: str
    size: int
    stored_at: float  # epoch seconds: newest wins against an input ref of the same name


@dataclass(slots=True)
class Workspace:
    id: str
    status: Literal["new", "reused"]
    files: dict[str, WorkspaceFile] = field(default_factory=dict)
    created_at: float = 0.0
    not_kept: list[str] = field(default_factory=list)  # generated names the commit could not keep

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())


class RuntimeStore:
    def __init__(self, sessions: SessionStore, files: FileStore, limits: RuntimeLimits) -> None:
        self.sessions = sessions
        self.files = files
        self.limits = limits

    @staticmethod
    def _manifest_key(rt_id: str) -> str:
        return f"runtime/{rt_id}/manifest.json"

    @asynccontextmanager
    async def open(self, rt_id: str) -> AsyncIterator[Workspace]:
        """Hold the runtime session's lock and yield its workspace (commit with ``commit``)."""
        owner = secrets.token_hex(8)
        lock = f"runtime:{rt_id}"
        deadline = trio.current_time() + self.limits.lock_wait
        pause = LOCK_POLL_MIN
        while not await self.sessions.try_lock(lock, owner, self.limits.lock_ttl):
            if trio.current_time() + pause > deadline:
                raise ApiError(
                    "Another call of this runtime session is still running; retry when it has finished",
                    status=409, error_type="runtime_session_busy",
                )
            await trio.sleep(pause)  # polling with a deadline: the lock may be held on another replica
            pause = min(LOCK_POLL_MAX, pause * 2)
        try:
            yield await self._load(rt_id)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    await self.sessions.unlock(lock, owner)
                except ApiError:
                    log.warning("runtime session lock %s not released; it lapses after its TTL", rt_id)

    async def _load(self, rt_id: str) -> Workspace:
        try:
            async with self.files.open(self._manifest_key(rt_id)) as chunks:
                raw = b"".join([chunk async for chunk in chunks])
        except NotFound:
            return Workspace(rt_id, "new", created_at=time.time())
        try:
            data = json.loads(raw)
            files = {name: WorkspaceFile(str(f["key"]), int(f["size"]), float(f["stored_at"]))
                     for name, f in data["files"].items()}
            updated, created = float(data["updated_at"]), float(data["created_at"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("runtime session %s has an unreadable manifest; starting it afresh", rt_id)
            return Workspace(rt_id, "new", created_at=time.time())
        if updated + self.limits.ttl_seconds < time.time():
            await self._delete([f.key for f in files.values()])
            return Workspace(rt_id, "new", created_at=time.time())
        return Workspace(rt_id, "reused", files, created_at=created)

    async def commit(
        self, ws: Workspace, sandbox: Sandbox, *, removed: set[str], changed: list[tuple[str, int]],
        max_file_bytes: int,
    ) -> None:
        """Store what the run changed, drop what it removed, then replace the manifest.

        ``changed``: ``(name, size)`` of files the run created or modified. Files that do not fit
        the limits, or cannot be read, are left out and named in ``ws.not_kept``.
        """
        old = dict(ws.files)
        files = {name: f for name, f in old.items() if name not in removed and name not in dict(changed)}
        written: list[str] = []
        try:
            for name, size in sorted(changed):
                if (len(files) >= self.limits.max_files or size > max_file_bytes
                        or sum(f.size for f in files.values()) + size > self.limits.max_bytes):
                    ws.not_kept.append(name)
                    continue
                key = f"runtime/{ws.id}/files/{new_id()}"
                try:
                    async with sandbox.open_file(name) as chunks:
                        stored = await self.files.put(key, chunks, content_type="application/octet-stream",
                                                      max_bytes=min(max_file_bytes, self.limits.max_bytes))
                except (NotFound, TooLarge) as exc:
                    ws.not_kept.append(name)
                    log.info("runtime file %s not kept: %s", name, exc.message)
                    continue
                written.append(key)
                files[name] = WorkspaceFile(key, stored, time.time())
            now = time.time()
            manifest = {
                "id": ws.id,
                "created_at": ws.created_at,
                "updated_at": now,
                "files": {n: {"key": f.key, "size": f.size, "stored_at": f.stored_at} for n, f in files.items()},
            }

            async def body() -> AsyncIterator[bytes]:
                yield json.dumps(manifest).encode()

            await self.files.put(self._manifest_key(ws.id), body(), content_type="application/json")
        except BaseException:
            await self._delete(written)  # never named by a manifest: invisible, and now gone
            raise
        ws.files = files
        live = {f.key for f in files.values()}
        await self._delete([f.key for f in old.values() if f.key not in live])

    async def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            for key in keys:
                try:
                    await self.files.delete(key)
                except ApiError:
                    log.warning("runtime object %s not deleted", key)
