"""Plain data the core passes around. No I/O, no framework types."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Literal

FOREVER = _dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_dt.timezone.utc)


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass(slots=True)
class Session:
    session_id: str
    status: Literal["active", "idle", "terminated", "error"]
    created_at: _dt.datetime
    last_activity: _dt.datetime
    expires_at: _dt.datetime
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status == "active" and self.expires_at > utcnow()


@dataclass(slots=True)
class FileRecord:
    """One stored file's metadata (KubeCodeRun's ``files:{sid}:{fid}`` hash)."""

    session_id: str
    file_id: str
    filename: str  # sanitised for uploads; raw basename for generated outputs
    content_type: str
    size: int
    created_at: _dt.datetime
    kind: Literal["upload", "output"]
    # Who uploaded it (LibreChat's ``User-Id`` header / ``user_id``), if known. Sessions are shared
    # by entity (an agent), so this is what keeps one user's unlisted uploads out of another's run.
    owner: str | None = None

    @property
    def object_key(self) -> str:
        folder = "uploads" if self.kind == "upload" else "outputs"
        return f"sessions/{self.session_id}/{folder}/{self.file_id}"

    @property
    def path(self) -> str:
        return f"/{self.filename}" if self.kind == "upload" else f"/outputs/{self.filename}"


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file an ``/exec`` request asks to mount: ``{id, session_id, name}``."""

    id: str
    session_id: str
    name: str


@dataclass(frozen=True, slots=True)
class GeneratedFile:
    """A file a run created or modified in its working directory."""

    name: str
    size: int
    content_type: str | None = None


@dataclass(slots=True)
class RunResult:
    """What a sandbox reports for one run.

    ``timed_out`` is explicit rather than encoded in an exit code: KubeCodeRun's runners disagree
    (124 from the 2.1.3 sidecar, -1 from the 3.x Go runner).
    """

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration_ms: float = 0.0
    # Set when the sandbox itself failed (pod died, OOM-killed, sidecar unreachable): a readable reason.
    failure: str | None = None
    # Files created or modified by the run, when the sandbox can tell; ``None`` means "ask it to list".
    generated: list[GeneratedFile] | None = None
    # Names present before the run and gone after it (``deleted_files``); ``None``: cannot tell.
    removed: list[str] | None = None
