"""The small interfaces the core needs, and nothing more: what its callers actually call.

Every backend implements one of these with the same shape, and each kind has an in-process twin
(``backends/memory_sessions.py``, ``backends/local_files.py``, ``backends/memory_executor.py``) so the
core can be tested without sockets. Production adapters (Redis, S3, Kubernetes) live beside them.

Cancellation contract, shared by all implementations:

* Every method may be cancelled at any ``await``. A cancelled call leaves no half-visible record:
  writers put bytes first and metadata last, and clean up what they started in a shielded
  ``finally`` with its own timeout.
* Methods that talk to a remote system bound their own waits (connect/read timeouts), so a caller
  that forgets a deadline still never hangs forever; callers add the request's deadline on top.
* A backend that cannot reach its system raises ``errors.Unavailable`` with a readable message,
  never a library exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .model import FileRecord, GeneratedFile, RunResult, Session

if TYPE_CHECKING:
    from .ptc_state import PtcState


@runtime_checkable
class SessionStore(Protocol):
    """Sessions and file metadata (KubeCodeRun keeps both in Redis)."""

    async def create_session(self, *, entity_id: str | None, user_id: str | None) -> Session: ...

    async def get_session(self, session_id: str) -> Session | None:
        """The session, or ``None``. Reading an active session refreshes ``last_activity``."""

    async def find_entity_session(self, entity_id: str) -> Session | None:
        """An active session of this entity, if any."""

    async def add_file(self, record: FileRecord) -> None:
        """Record metadata for bytes already in the file store (call last)."""

    async def get_file(self, session_id: str, file_id: str) -> FileRecord | None: ...

    async def list_files(self, session_id: str) -> list[FileRecord]:
        """The session's files, oldest first; ``[]`` for an unknown session."""

    async def list_files_and_session(self, session_id: str) -> tuple[list[FileRecord], Session | None]:
        """``(list_files(sid), get_session(sid))``, the session refreshed as ``get_session`` does,
        in one call where the store can (``/files?detail=summary``, LibreChat's priming call, needs
        both: one Redis round trip instead of three)."""

    async def delete_file(self, session_id: str, file_id: str) -> FileRecord | None:
        """Remove and return the metadata, or ``None`` if there was none."""

    async def hit(self, key: str, window_seconds: int) -> int:
        """Count one event in a fixed window shared by all replicas; returns the count so far."""

    async def ping(self) -> dict[str, Any]:
        """Raise ``Unavailable`` if the store cannot serve; else a small status dict."""

    async def try_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        """Take the lock ``key`` for ``owner`` unless someone holds it; it lapses after the TTL
        (so a replica that dies holding it blocks nobody for longer). Shared by all replicas."""

    async def unlock(self, key: str, owner: str) -> None:
        """Release ``key`` if ``owner`` still holds it (never someone else's later lock)."""

    async def expired_sessions(self) -> list[str]:
        """Ids of sessions to purge (``core.files.purge_session``): past their ``expires_at``, or
        indexed with their record gone (KubeCodeRun: "orphaned, missing data"). Expired sessions
        stay invisible to readers until they are forgotten."""

    async def forget_session(self, session_id: str) -> None:
        """Drop the session record, its file metadata, index entry and entity memberships: the
        last step of a purge, after the files' bytes are gone. Idempotent."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """Bytes already complete in a local file (an upload's spool, ``api/uploads.py``): ``size``
    bytes at ``path``. Handed to ``FileStore.put`` instead of chunks so the store can send the file
    as it is (S3) or link it into place (local disk) rather than copying it a second time: a
    10 MB upload spent a third of its CPU on that second copy. The file belongs to the caller,
    stays in place until ``put`` returns, and is never changed or moved by the store."""

    path: Path
    size: int
    # Hex SHA-256 of the bytes, when the writer computed it on the way (the edge hashes as it
    # spools): an S3 PUT signs it, and hashing the file again was a tenth of an upload's CPU.
    sha256: str | None = None


# What ``FileStore.put`` stores: chunks as they come, or a file already complete on local disk.
Body = AsyncIterable[bytes] | Spooled


@runtime_checkable
class FileStore(Protocol):
    """File bytes by object key (``sessions/{sid}/uploads/{fid}``, ``.../outputs/{fid}``)."""

    async def put(self, key: str, chunks: Body, *, content_type: str, max_bytes: int | None = None) -> int:
        """Stream ``chunks`` (or a ``Spooled`` file) into ``key``; return the size. Atomic:
        readers see all or nothing.

        Raises ``errors.TooLarge`` (and stores nothing) when more than ``max_bytes`` arrive.
        """

    def open(self, key: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream the object's bytes; raises ``errors.NotFound`` on entry if it does not exist.

        Leaving the context (also by cancellation) releases the underlying connection or handle.
        """

    async def delete(self, key: str) -> None:
        """Remove the object; missing objects are not an error (idempotent)."""

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a folder-like ``prefix`` (``sessions/<sid>/uploads/``, ending
        in ``/``); returns how many were removed (``0`` when there were none). Idempotent."""

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, modified epoch seconds)`` under ``prefix``, in key order, after
        ``start_after``: one page of the orphan sweeper's walk. Only complete objects are listed."""

    async def ping(self) -> dict[str, Any]: ...


@runtime_checkable
class Sandbox(Protocol):
    """One isolated place to run one program once (a sidecar process or a pod)."""

    async def put_file(self, name: str, chunks: AsyncIterable[bytes]) -> None:
        """Place an input file in the working directory under ``name`` (a sanitised basename)."""

    async def run(self, code: str, *, timeout: float, request_id: str, args: Sequence[str] = ()) -> RunResult:
        """Run ``code``. Cancelling this call kills the program's whole process tree.

        ``args`` (contract §4.3) are the program's command-line arguments (``sys.argv[1:]``,
        ``process.argv.slice(2)``, ``$1``...), passed as argv, never through a shell.

        Program failures (non-zero exit, timeout, limits hit) are results, not exceptions; only a
        broken sandbox raises (``errors.Unavailable``).
        """

    async def generated_files(self) -> list[GeneratedFile]:
        """Files the run created or modified, excluding untouched inputs and runner by-products."""

    def open_file(self, name: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream one file out of the working directory; ``errors.NotFound`` if absent."""


@runtime_checkable
class Executor(Protocol):
    """Hands out sandboxes, one run each, from warm pools where it can.

    Besides the two methods, the app reads three facts about an executor at start-up: what it
    found wrong with its host (``warnings``), whether its sandboxes speak the sidecar's
    programmatic-tool-calling channel (``ptc_capable``), and how many runs it can hold at once
    (``capacity``). Read-only here, so an implementation may keep them as plain attributes.
    """

    @property
    def warnings(self) -> list[str]:
        """Start-up findings (no per-run memory bound, an unsafe sandbox root...): shown by
        ``/ready``. Empty when there is nothing to say."""

    @property
    def ptc_capable(self) -> bool:
        """Its sandboxes run the sidecar, which carries ``/exec/programmatic``'s tool-call channel.
        ``False`` turns the PTC routes off (``api/ptc_http.open_ptc``)."""

    @property
    def capacity(self) -> int | None:
        """Concurrent runs it can hold (a fixed slot count), or ``None`` when there is no fixed
        count (pods are created on demand). PTC sizes its suspended-run limit from it."""

    def sandbox(self, language: str, *, wait: float) -> AbstractAsyncContextManager[Sandbox]:
        """A fresh sandbox for ``language``.

        Raises ``errors.Busy`` when none frees up within ``wait`` seconds. Leaving the context, also
        by cancellation, releases the sandbox *after the answer*: it returns at once and the
        executor destroys (or resets) the sandbox in its own nursery, killing anything still
        running in it, shielded and bounded by its own timeout. The slot stays counted as in use
        (``status()["in_use"]``) until that release ends, so capacity is never overstated.
        """

    async def status(self) -> dict[str, Any]:
        """Pool sizes and readiness, for ``/ready`` and metrics. ``{"ready": bool, ...}``."""


class PtcStore(Protocol):
    """Where programmatic tool calling keeps execution state (``backends/ptc_store.py``): in process
    for one replica, in Redis when replicas share executions (``shared``). Failures are
    ``errors.Unavailable`` (503), as for sessions."""

    shared: bool

    async def save(self, state: PtcState, ttl: float) -> None: ...
    async def load(self, execution_id: str) -> PtcState | None: ...
    async def delete(self, execution_id: str) -> None: ...

    async def claim(self, execution_id: str, generation: int, replica: str) -> bool:
        """Take over an orphaned execution's round ``generation``; exactly one replica wins."""

    async def add_request(self, request_id: str, record: dict[str, Any], ttl: float) -> dict[str, Any] | None:
        """Record a request id unless it exists; the existing record if it does."""

    async def get_request(self, request_id: str) -> dict[str, Any] | None: ...
    async def set_request(self, request_id: str, record: dict[str, Any], ttl: float) -> None: ...

    async def heartbeat(self, replica: str, url: str, ttl: float) -> None:
        """Say this replica is alive and reachable at ``url`` for ``ttl`` seconds."""

    async def alive(self, replica: str) -> bool: ...
