"""Sweeping file objects that have no metadata (audit finding 9).

Bytes are written before their metadata and removed after it, so an interrupted writer or deleter
can leave bytes nobody references: a cancelled upload whose PUT landed after its clean-up delete,
an output stored while Redis was down, a ``DELETE`` whose object removal failed. They are invisible
(nothing lists them) but they are the user's data and must not stay forever, also when sessions
never expire (``SESSION_TTL_HOURS=0``, where session clean-up never visits them).

Every ``KCR_ORPHAN_SWEEP_INTERVAL`` seconds one pass looks at up to ``BATCH`` objects under
``sessions/`` (continuing where the last pass stopped, wrapping around), and for each object in our
layout (``sessions/{sid}/uploads|outputs/{fid}``) older than ``KCR_ORPHAN_MIN_AGE`` asks the session
store for its metadata; if there is none, the object is deleted. The age guard leaves writers in
flight alone (their metadata follows their bytes within seconds; the default is an hour). A store
that cannot answer ends the pass: an outage is never taken for "no metadata". Keys outside the
layout (KubeCodeRun's ``states/``, health-check objects) are never touched.

The loop belongs to the app's background nursery (``app.open_services``), like session clean-up.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import trio

from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError
from kcr_trio.core.interfaces import FileStore, SessionStore

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^sessions/([A-Za-z0-9_-]{1,64})/(uploads|outputs)/([A-Za-z0-9_-]{1,64})$")
BATCH = 1000


class OrphanSweeper:
    def __init__(self, sessions: SessionStore, files: FileStore, *, min_age: float, clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.files = files
        self.min_age = min_age
        self.clock = clock
        self.cursor = ""  # the last key looked at; the next pass starts after it
        self.removed = 0

    async def sweep_once(self) -> int:
        """One pass over at most ``BATCH`` objects; returns how many orphans it removed."""
        objects = await self.files.list_objects("sessions/", start_after=self.cursor, limit=BATCH)
        self.cursor = objects[-1][0] if len(objects) == BATCH else ""  # a short page: wrap around
        now = self.clock()
        removed = 0
        for key, modified in objects:
            match = KEY_RE.match(key)
            if match is None or now - modified < self.min_age:
                continue
            sid, _, fid = match.groups()
            if await self.sessions.get_file(sid, fid) is not None:
                continue
            await self.files.delete(key)
            removed += 1
            log.info("orphan sweeper: removed an object without metadata", extra={"object_key": key})
        self.removed += removed
        return removed


async def run_orphan_sweeper(
    sessions: SessionStore,
    files: FileStore,
    settings: Settings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Sweep forever, every ``KCR_ORPHAN_SWEEP_INTERVAL`` seconds; never raises for an outage."""
    sweeper = OrphanSweeper(sessions, files, min_age=settings.kcr_orphan_min_age)
    interval = settings.kcr_orphan_sweep_interval
    task_status.started()
    while True:
        with trio.move_on_after(max(interval, 1.0) * 10):  # one pass never hangs the loop
            try:
                await sweeper.sweep_once()
            except ApiError as exc:
                log.warning("orphan sweep skipped: %s", exc.message)
        await trio.sleep(interval)
