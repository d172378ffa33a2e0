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

Error mapping (one helper for every asyncio-backed store, shaped like httpcore's
``map_exceptions``): :meth:`StoreErrors.call` runs one bridged operation under a Trio deadline and
turns what can go wrong into the core's errors — no answer in time, the bridge closing, and (through
the store's ``translate``) the client library's own exceptions. The store says only what differs:
its name for messages, its peer's name, and how to read its library's errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

from kcr_trio.core.errors import ApiError, Unavailable
from kcr_trio.core.throttle import Throttle

T = TypeVar("T")

__all__ = ["BridgeClosed", "BridgeMissing", "StoreErrors", "Translate", "bridge_running", "open_bridge", "run_aio"]

# A client library's exception -> the core error to raise instead, or ``None`` when the exception is
# not a failure of the peer (it is re-raised as it is).
Translate = Callable[[Exception], "Exception | None"]


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


class StoreErrors:
    """How one asyncio-backed store reports failures: ``"<store> unavailable: <reason>"`` (503 with
    ``Retry-After``), client-safe reasons only, and the underlying error logged at most every 10 s
    (an outage fails every request; one line per request would bury the one that says what broke).
    """

    def __init__(self, store: str, peer: str, logger: logging.Logger, *, retry_after: float = 2) -> None:
        self.store = store  # "Session store": how clients know which dependency failed
        self.peer = peer  # "Redis": who did not answer
        self.retry_after = retry_after
        self._log = logger
        self._throttle = Throttle(10.0)

    def unavailable(self, reason: str) -> Unavailable:
        return Unavailable(f"{self.store} unavailable: {reason}", retry_after=self.retry_after)

    def log_failure(self, exc: BaseException) -> None:
        """Log the underlying error, at most every 10 s."""
        if self._throttle.ready():
            self._log.warning("%s operation failed: %s: %s", self.peer, type(exc).__name__, exc)

    @contextmanager
    def map_exceptions(self, translate: Translate) -> Iterator[None]:
        """Bridge and library exceptions raised inside the block -> the core's errors."""
        try:
            yield
        except BridgeClosed:
            raise self.unavailable("shutting down") from None
        except BridgeMissing:
            raise  # a wiring bug, not an outage: let it surface
        except ApiError:
            raise  # already the core's (the deadline below, or a store's own check)
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        timeout: float,
        translate: Translate,
        limiter: trio.CapacityLimiter | None = None,
        bridged: bool = True,
    ) -> T:
        """``await fn()`` on the asyncio side within ``timeout`` seconds (queueing for ``limiter``
        included), with every failure mapped (see :meth:`map_exceptions`). ``bridged=False``: ``fn``
        is a Trio coroutine function (a Trio-native client of the same store), awaited directly
        under the same deadline and mapping."""
        with self.map_exceptions(translate):
            try:
                with trio.fail_after(timeout):
                    if not bridged:
                        return await fn()
                    if limiter is None:
                        return await run_aio(fn)
                    async with limiter:
                        return await run_aio(fn)
            except trio.TooSlowError:
                raise self.unavailable(f"no answer from {self.peer} within {timeout:g}s") from None
