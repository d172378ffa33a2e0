"""Removing expired sessions, the way KubeCodeRun does it, so both servers can run it side by side.

Every ``SESSION_CLEANUP_INTERVAL_MINUTES`` one pass:

1. asks the session store for sessions to clean (``expired_sessions()``): ids whose record is gone
   (KubeCodeRun: "orphaned, missing data") or whose ``expires_at`` has passed;
2. for each: deletes the file *metadata* first (readers stop seeing the files), then the objects,
   by record and by the ``sessions/{sid}/uploads/`` and ``.../outputs/`` prefixes (catches objects
   whose metadata expired or was never written), and finally the session record with its index and
   entity memberships (``forget_session``).

Every step is idempotent, so two replicas, or kcr-trio and KubeCodeRun, may clean the same session
at the same time, and a pass interrupted half-way (crash, cancellation, outage) is finished by the
next one: the session record goes last, so the session is still listed until everything else is
gone. Ordering metadata before bytes means an interrupted pass can leave unreferenced bytes (swept
by the prefix delete next time) but never metadata pointing at missing bytes.

The purge order itself is the file domain's (``core.files.purge_session``); this module owns the
loop. Both are written against the ``SessionStore``/``FileStore`` protocols, which every store
implements in full (``expired_sessions``, ``forget_session``, ``delete_prefix``).

Cancellation: the loop sleeps and works under its owner's nursery; cancelling it stops between
(or inside) steps, which is safe for the reasons above. One pass is bounded by the interval.
"""

from __future__ import annotations

import logging

import trio

from kcr_trio.config import Settings
from kcr_trio.core.errors import ApiError
from kcr_trio.core.files import purge_session
from kcr_trio.core.interfaces import FileStore, SessionStore

log = logging.getLogger(__name__)

__all__ = ["cleanup_expired_sessions", "purge_session", "run_session_cleanup"]


async def cleanup_expired_sessions(store: SessionStore, files: FileStore) -> int:
    """One pass; returns how many sessions were purged. Errors on one session do not stop the
    pass (the next pass retries it); an unreachable store ends the pass early."""
    purged = 0
    for sid in await store.expired_sessions():
        try:
            await purge_session(store, files, sid)
            purged += 1
        except ApiError as exc:
            log.warning("session cleanup: could not purge %s: %s", sid, exc.message)
            if exc.status == 503:
                break
    return purged


async def run_session_cleanup(
    store: SessionStore,
    files: FileStore,
    settings: Settings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run :func:`cleanup_expired_sessions` forever, every ``SESSION_CLEANUP_INTERVAL_MINUTES``.

    Start it in the app's lifespan nursery (``await nursery.start(run_session_cleanup, ...)``); it
    never raises for a store outage (it logs and waits for the next interval).
    """
    interval = settings.session_cleanup_interval_minutes * 60.0
    task_status.started()
    while True:
        with trio.move_on_after(interval):  # a pass never outlives its interval
            try:
                purged = await cleanup_expired_sessions(store, files)
                if purged:
                    log.info("session cleanup: purged %d expired sessions", purged)
            except ApiError as exc:
                log.warning("session cleanup skipped: %s", exc.message)
        await trio.sleep(interval)
