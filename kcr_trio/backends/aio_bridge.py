"""The one place where Trio meets asyncio.

The production stores use asyncio-only clients (redis-py's ``redis.asyncio`` and ``miniopy-async``,
which sits on aiohttp). ``trio-asyncio`` runs an asyncio event loop *inside* the Trio run, so those
clients work in the same thread as the rest of the server. Nothing else in the code base may import
``trio_asyncio`` or an asyncio-only library: the adapters call :func:`run_aio` and nothing more.

Hosting: the bridge needs a loop opened with ``trio_asyncio.open_loop()`` *around* every task that
calls into it. The ``hypercorn`` command line cannot provide that, so the server is started from our
own code (``kcr-trio serve``) inside :func:`open_bridge`, entered once at start-up before the
backends are opened. Tasks inherit the loop through a context variable, so everything started
from inside the ``async with`` block (Hypercorn's connection tasks, lifespan nurseries) can use it.

Cancellation semantics (this is why the bridge is safe to use on the request path):

* Cancelling the Trio caller cancels the asyncio task (one ``asyncio.CancelledError`` thrown into
  the coroutine), and :func:`run_aio` *waits for that task to finish* before raising
  ``trio.Cancelled``. So the library's own ``finally`` blocks (returning a Redis connection to its
  pool, closing an aiohttp connection that was cut mid-request) have run when the caller resumes.
* A library that swallowed the cancellation would make the caller wait for it to finish; the
  clients used here do not, and the adapters bound every call with their own deadline anyway.
* ``asyncio.CancelledError`` never leaks into Trio code: it comes back as ``trio.Cancelled`` when
  the Trio scope was cancelled. If the asyncio side cancelled itself (for example the loop is
  shutting down), :func:`run_aio` raises :class:`BridgeClosed`, an ordinary exception that the
  adapters map to ``errors.Unavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio_asyncio

T = TypeVar("T")

__all__ = ["BridgeClosed", "BridgeMissing", "bridge_running", "open_bridge", "run_aio"]


class BridgeMissing(RuntimeError):
    """An asyncio backend was used outside :func:`open_bridge` (a start-up wiring bug)."""


class BridgeClosed(RuntimeError):
    """The asyncio side cancelled or closed underneath a call that Trio did not cancel."""


def bridge_running() -> bool:
    """True when the current task can use :func:`run_aio`."""
    return trio_asyncio.current_loop.get() is not None


@asynccontextmanager
async def open_bridge() -> AsyncIterator[None]:
    """Host asyncio clients for everything started inside this block.

    Re-entrant: if a bridge is already open in this context (a test fixture opened one, or the app
    was composed twice), this is a no-op, so callers need not coordinate. Leaving the block cancels
    whatever asyncio tasks are still running and closes the loop; open it outside the nursery that
    owns the backends so that they are closed first.
    """
    if bridge_running():
        yield
        return
    async with trio_asyncio.open_loop():
        yield


async def run_aio(fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
    """Run ``await fn(*args, **kwargs)`` as an asyncio task and wait for it from Trio.

    The coroutine is *created* inside the asyncio context (not in the caller's Trio context), which
    matters for libraries that look up the running loop when a coroutine starts. See the module
    docstring for what cancellation does.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise BridgeMissing(
            "asyncio backend used outside open_bridge(): start the server inside "
            "kcr_trio.backends.aio_bridge.open_bridge()"
        )
    try:
        result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
        return result
    except asyncio.CancelledError as exc:
        # Only reached when Trio did not cancel us (trio-asyncio turns that case into
        # trio.Cancelled): the loop is going away. Keep asyncio's exception out of Trio code.
        raise BridgeClosed("asyncio loop cancelled the operation (shutting down?)") from exc
