"""The one place that calls the official ``kubernetes`` client.

The client is synchronous (urllib3), so every call runs in a worker thread via
``trio.to_thread.run_sync`` with its own connect/read timeouts, and every answer comes back as the
plain Kubernetes JSON (``dict``, camelCase keys, read with ``_preload_content=False``): the executor
works on the wire format, never on the client's generated model classes.

Cancellation semantics:

* Unary calls (create/list/delete) run in threads started with ``abandon_on_cancel=True``:
  a cancelled caller returns at once; the abandoned thread finishes on its own within its request
  timeout and its result is dropped. Callers that must know the outcome of a create therefore name
  pods themselves (no ``generateName``) and sweep by label at shutdown.
* A watch reads the raw chunked response. A cancelled ``next()`` would otherwise wait for the next
  event in its thread (seconds to minutes); instead the thread is abandoned and leaving the watch
  context calls the response's ``shutdown()`` (which unblocks the socket read) and ``close()``, so a
  cancelled watch stops within milliseconds.
* Library errors never escape: they become :class:`KubeError` (an ``errors.Unavailable``) with the
  API's own ``Status.message`` where there is one.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from kcr_trio.core.errors import Unavailable

_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeError(Unavailable):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when unreachable), and
    ``retry_after`` the seconds the API server asked us to wait (429 and 5xx answers)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.reason = reason
        self.retry_after = retry_after

    @property
    def refused(self) -> bool:
        """The API server answered and rejected the request (4xx other than a timeout or a rate
        limit): nothing was created, and repeating the request unchanged will not help soon."""
        return 400 <= self.http_status < 500 and self.http_status not in (408, 429)


def load_api_client(kubeconfig: str | None = None, *, pool_size: int = 32) -> Any:
    """An ``ApiClient``: in-cluster config when running in a pod, else the kubeconfig file.

    Blocking (reads files); call it in a thread. Retries are limited to one so that a dead API
    server costs at most about two connect timeouts per call.
    """
    import urllib3
    from kubernetes import client, config

    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig or None, client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = pool_size
    # One retry for connection errors only. urllib3 would otherwise retry a 429/503 carrying
    # Retry-After itself, sleeping in the worker thread and then raising MaxRetryError without the
    # status; we want the answer, and wait (cancellably) in Trio instead.
    cfg.retries = urllib3.util.Retry(total=1, status=0, redirect=0, respect_retry_after_header=False,
                                     raise_on_status=False)
    return client.ApiClient(configuration=cfg)


def default_namespace(*candidates: str | None) -> str:
    """The first non-empty candidate, else the service account's namespace, else ``default``."""
    for c in candidates:
        if c:
            return c
    try:
        with open(_SA_NAMESPACE_FILE) as fh:
            return fh.read().strip() or "default"
    except OSError:
        return "default"


class KubeApi:
    """Pods in one namespace (plus reads in others), from Trio."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        max_threads: int = 16,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._timeout = (connect_timeout, read_timeout)
        self._limiter = trio.CapacityLimiter(max_threads)
        # Watches hold a thread for as long as they wait for an event: keep them off the unary pool.
        self._watch_limiter = trio.CapacityLimiter(8)

    @classmethod
    async def connect(cls, kubeconfig: str | None, namespace: str, **kw: Any) -> KubeApi:
        try:
            api_client = await trio.to_thread.run_sync(load_api_client, kubeconfig, abandon_on_cancel=True)
        except Exception as exc:  # config files missing/invalid: say so plainly
            raise KubeError(f"cannot load Kubernetes configuration: {exc}") from exc
        return cls(api_client, namespace, **kw)

    def close(self) -> None:
        """Close the connection pool (no thread or await needed)."""
        try:
            self._api_client.rest_client.pool_manager.clear()
        except Exception:  # best effort at shutdown
            pass

    # ------------------------------------------------------------------ unary calls

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run ``fn`` in a thread, decode the JSON body, map errors to ``KubeError``."""
        kw.setdefault("_request_timeout", self._timeout)
        kw["_preload_content"] = False

        def call() -> Any:
            resp = fn(*args, **kw)
            try:
                data = resp.data
            finally:
                resp.release_conn()
            return json.loads(data) if data else None

        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._limiter)
        except Exception as exc:
            raise _as_kube_error(exc) from exc

    async def create_pod(self, manifest: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self._call(self._core.create_namespaced_pod, self.namespace, manifest)
        return created

    async def list_pods(
        self, selector: str | None = None, namespace: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """Matching pods and the list's ``resourceVersion`` (to start a watch from)."""
        kw = {"label_selector": selector} if selector else {}
        body = await self._call(self._core.list_namespaced_pod, namespace or self.namespace, **kw)
        return body.get("items") or [], str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def delete_pod(self, name: str, *, grace_seconds: int | None = None) -> bool:
        """Ask for deletion; ``False`` when the pod was already gone."""
        kw = {} if grace_seconds is None else {"grace_period_seconds": grace_seconds}
        try:
            await self._call(self._core.delete_namespaced_pod, name, self.namespace, **kw)
        except KubeError as exc:
            if exc.http_status == 404:
                return False
            raise
        return True

    # ------------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, selector: str, resource_version: str, *, timeout_seconds: int = 300
    ) -> AsyncIterator[PodWatch]:
        """Events for matching pods after ``resource_version``; the server ends the stream after
        ``timeout_seconds`` (then ``next()`` returns ``None`` and the caller re-watches)."""
        kw: dict[str, Any] = {
            "label_selector": selector,
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_seconds,
            "_preload_content": False,
            # Read timeout beyond the server's own end of stream: a dead connection is noticed.
            "_request_timeout": (self._timeout[0], timeout_seconds + 30),
        }
        if resource_version:
            kw["resource_version"] = resource_version
        try:
            resp = await trio.to_thread.run_sync(
                lambda: self._core.list_namespaced_pod(self.namespace, **kw),
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
        except Exception as exc:
            raise _as_kube_error(exc) from exc
        w = PodWatch(resp, self._watch_limiter)
        try:
            yield w
        finally:
            w.stop()


class PodWatch:
    """Newline-delimited watch events read from a raw streaming response."""

    def __init__(self, resp: Any, limiter: trio.CapacityLimiter) -> None:
        self._resp = resp
        self._segments = resp.stream(amt=None, decode_content=False)
        self._limiter = limiter
        self._buf = b""
        self._ended = False

    async def next(self) -> dict[str, Any] | None:
        """The next event ``{"type", "object"}``, or ``None`` when the server ended the stream."""
        while b"\n" not in self._buf:
            if self._ended:
                return None
            try:
                seg = await trio.to_thread.run_sync(self._read, abandon_on_cancel=True, limiter=self._limiter)
            except Exception as exc:
                raise _as_kube_error(exc) from exc
            if seg is None:
                self._ended = True
                if self._buf.strip():
                    self._buf += b"\n"
                continue
            self._buf += seg
        line, self._buf = self._buf.split(b"\n", 1)
        if not line.strip():
            return await self.next()
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise KubeError(f"bad watch event from the Kubernetes API: {line[:200]!r}") from exc
        return event

    def _read(self) -> bytes | None:
        return next(self._segments, None)

    def stop(self) -> None:
        """Unblock any thread still reading (``shutdown``), then release the connection."""
        for step in ("shutdown", "close", "release_conn"):
            try:
                getattr(self._resp, step)()
            except Exception:  # the socket may already be gone: nothing left to stop
                pass


def _as_kube_error(exc: BaseException) -> KubeError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        message, reason = exc.reason or "error", ""
        try:
            body = json.loads(exc.body or b"{}")
            message, reason = body.get("message") or message, body.get("reason") or ""
        except (ValueError, TypeError):
            pass
        return KubeError(f"Kubernetes API answered {exc.status}: {message}", status=exc.status or 0, reason=reason,
                         retry_after=_retry_after((exc.headers or {}).get("Retry-After")))
    return KubeError(f"Kubernetes API unreachable: {type(exc).__name__}: {exc}")


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped at five minutes."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            import datetime as dt

            seconds = (parsedate_to_datetime(value) - dt.datetime.now(dt.UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(300.0, max(0.0, seconds))
