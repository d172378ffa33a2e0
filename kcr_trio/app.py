"""Composition root: settings → backends → services → app → Hypercorn.

Backends are opened here, in one ``AsyncExitStack`` that the server's lifetime owns: their background
work (pool replenishment, session clean-up) lives in nurseries they open, and leaving the stack —
on SIGTERM after the in-flight requests drained — closes them in reverse order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from kcr_trio import log_stream
from kcr_trio.api import exec_fast
from kcr_trio.api.app_factory import create_app
from kcr_trio.api.auth import Authenticator
from kcr_trio.api.connection_policy import CloseForAxiosClients
from kcr_trio.api.files_fast import fast_router
from kcr_trio.api.h11_head import install_coalesced_head
from kcr_trio.api.metrics import Metrics
from kcr_trio.api.ops_http import render_metrics
from kcr_trio.api.ratelimit import RateLimiter
from kcr_trio.api.ready_io import ReadyReceive, install_ready_send
from kcr_trio.api.scope import RequestScopeMiddleware
from kcr_trio.api.services import UNAUTH_BUDGET, Services
from kcr_trio.api.wire import (
    CloseAmbiguousFraming,
    CloseOnEarlyAnswer,
    install_half_close_support,
    install_json_rejections,
    install_stalled_head_408,
)
from kcr_trio.config import Settings
from kcr_trio.core.exec import ExecLimits, ExecService
from kcr_trio.core.interfaces import Executor, FileStore, SessionStore
from kcr_trio.core.runtime import RuntimeLimits, RuntimeStore
from kcr_trio.logs import setup_logging

log = logging.getLogger("kcr_trio.app")


def exec_limits(settings: Settings) -> ExecLimits:
    return ExecLimits(
        max_execution_time=settings.max_execution_time,
        overhead=settings.kcr_exec_overhead,
        acquire_timeout=settings.kcr_acquire_timeout,
        max_output_chars=settings.kcr_max_output_chars,
        max_output_files=settings.max_output_files,
        max_file_bytes=settings.max_file_bytes,
        max_code_bytes=settings.kcr_max_code_bytes,
        max_file_refs=settings.kcr_max_file_refs,
        compile_timeout=settings.kcr_compile_timeout,
    )


def ensure_keys(settings: Settings) -> tuple[str, ...]:
    """The configured keys; with none configured, a generated key kept in the data directory."""
    if settings.keys:
        return settings.keys
    path = settings.kcr_data_dir / "api-key"
    if path.exists():
        key = path.read_text().strip()
    else:
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
    log.warning("no API_KEY configured: using the generated key stored in %s", path)
    return (key,)


def runtime_store(settings: Settings, sessions: SessionStore, files: FileStore) -> RuntimeStore | None:
    """The stateful profile's workspaces, when ``KCR_EXECUTION_PROFILES`` serves it."""
    from kcr_trio.api.profiles import served_profiles

    if "stateful" not in served_profiles(settings):
        return None
    return RuntimeStore(sessions, files, RuntimeLimits(
        ttl_seconds=settings.kcr_runtime_session_ttl_hours * 3600,
        max_bytes=settings.kcr_runtime_session_max_mb * 1024 * 1024,
        max_files=settings.kcr_runtime_session_max_files,
        lock_wait=settings.kcr_runtime_session_lock_wait,
        lock_ttl=settings.max_execution_time + settings.kcr_exec_overhead + settings.kcr_compile_timeout + 10.0,
    ))


def build_authenticator(settings: Settings) -> Authenticator:
    """API keys, LibreChat JWTs or both (``KCR_AUTH_PROVIDER``); a bad JWT setup stops start-up."""
    from kcr_trio.api.jwt_auth import JwtVerifier

    mode = settings.auth_provider
    verifier = None
    if mode in ("librechat-jwt", "both"):
        verifier = JwtVerifier(
            public_key_file=settings.kcr_jwt_public_key_file,
            jwks_file=settings.kcr_jwt_jwks_file,
            audience=settings.kcr_jwt_audience,
            issuer=settings.kcr_jwt_issuer,
            algorithms=[a.strip() for a in settings.kcr_jwt_algorithms.split(",") if a.strip()],
            max_lifetime=settings.kcr_jwt_max_lifetime,
            leeway=settings.kcr_jwt_leeway,
        )
    return Authenticator(
        ensure_keys(settings) if mode != "librechat-jwt" else (),
        settings.auth_trusted_networks,
        exempt=() if settings.kcr_metrics_auth else ("/metrics",),
        jwt=verifier,
        accept_keys=mode != "librechat-jwt",
    )


@asynccontextmanager
async def open_services(settings: Settings, *, executor: Executor | None = None) -> AsyncIterator[Services]:
    """Open every backend the settings select; ``executor`` overrides the executor (tests)."""
    data_dir = Path(settings.kcr_data_dir)
    spool_dir = data_dir / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    sessions: SessionStore
    files: FileStore
    async with AsyncExitStack() as stack:
        if settings.kcr_session_store == "redis" or settings.kcr_file_store == "s3":
            from kcr_trio.backends.aio_bridge import open_bridge

            await stack.enter_async_context(open_bridge())

        if settings.kcr_session_store == "redis":
            from kcr_trio.backends.redis_sessions import open_redis_sessions

            sessions = await stack.enter_async_context(open_redis_sessions(settings))
        else:
            from kcr_trio.backends.memory_sessions import MemorySessionStore

            sessions = MemorySessionStore(ttl_hours=settings.session_ttl_hours)

        if settings.kcr_file_store == "s3":
            from kcr_trio.backends.s3_files import open_s3_files

            files = await stack.enter_async_context(open_s3_files(settings))
        else:
            from kcr_trio.backends.local_files import LocalFileStore

            files = LocalFileStore(data_dir / "files")

        if executor is None:
            if settings.kcr_executor == "kubernetes":
                from kcr_trio.backends.kubernetes_executor import open_kubernetes_executor

                executor = await stack.enter_async_context(open_kubernetes_executor(settings))
            else:
                from kcr_trio.backends.local_executor import open_local_executor

                executor = await stack.enter_async_context(open_local_executor(settings))
        warnings.extend(executor.warnings)

        # Background work the server's lifetime owns: expired sessions are purged (bytes, then
        # metadata, then the record), idempotently, so KubeCodeRun may clean the same stores.
        from kcr_trio.backends.session_cleanup import run_session_cleanup

        background = await stack.enter_async_context(trio.open_nursery())
        stack.callback(background.cancel_scope.cancel)  # runs first on exit: stop the loop, then close
        await background.start(run_session_cleanup, sessions, files, settings)
        if settings.kcr_orphan_sweep:
            from kcr_trio.backends.orphan_sweeper import run_orphan_sweeper

            await background.start(run_orphan_sweeper, sessions, files, settings)

        exec_service = ExecService(sessions, files, executor, exec_limits(settings),
                                   runtime=runtime_store(settings, sessions, files))
        from kcr_trio.api.ptc_http import open_ptc

        ptc, ptc_client = await stack.enter_async_context(open_ptc(settings, sessions, exec_service, background))
        yield Services(
            settings=settings,
            sessions=sessions,
            files=files,
            executor=executor,
            exec_service=exec_service,
            ptc=ptc,
            ptc_http=ptc_client,
            auth=build_authenticator(settings),
            spool_dir=spool_dir,
            warnings=warnings,
            metrics=Metrics() if settings.kcr_metrics else None,
            limiter=RateLimiter(
                sessions,
                per_minute=settings.kcr_rate_limit_per_minute,
                per_hour=settings.kcr_rate_limit_per_hour,
                auth_failures_per_minute=settings.kcr_auth_failures_per_minute,
            )
            if settings.rate_limit_enabled
            else None,
        )


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.api_host}:{settings.api_port}"]
    # Well above the 5 s client idle timer, so the client always closes first (keepalive.md §5).
    config.keep_alive_timeout = settings.kcr_keep_alive_timeout
    config.kcr_head_timeout = settings.kcr_head_timeout  # type: ignore[attr-defined]  # api/wire.py
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None  # ours is written by api.scope, one line per request
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


def build_asgi(svc: Services) -> Any:
    on_finish = svc.metrics.on_finish if svc.metrics is not None else None
    install_json_rejections()
    install_half_close_support()
    install_stalled_head_408()
    install_coalesced_head()
    install_ready_send()
    app = create_app(svc)
    scoped = RequestScopeMiddleware(app, on_finish=on_finish,
                                    fast_route=fast_router(svc, app.extensions[UNAUTH_BUDGET]))
    settings = svc.settings
    return ReadyReceive(CloseAmbiguousFraming(CloseOnEarlyAnswer(CloseForAxiosClients(
        scoped, enabled=settings.kcr_connection_close, clients=settings.kcr_connection_close_clients))),
        when=lambda method, path: exec_fast.is_exec(method, path))


def metrics_asgi(svc: Services) -> Any:
    """The app of the separate metrics port (``KCR_METRICS_PORT``): ``GET /metrics`` and nothing else.

    Plain ASGI (no Quart, no request scope): scrapes are not API requests and are not counted.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop: acknowledge both
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        status, content_type, body = 200, "text/plain; version=0.0.4; charset=utf-8", b""
        if scope.get("path") != "/metrics" or scope.get("method") not in ("GET", "HEAD"):
            status, content_type, body = 404, "application/json", b'{"error":"Not found"}'
        elif svc.settings.kcr_metrics_auth and not svc.auth.is_trusted((scope.get("client") or (None,))[0]):
            try:
                svc.auth.check(svc.auth.header_key(headers))
            except Exception as exc:
                status, content_type = 401, "application/json"
                body = json.dumps({"error": getattr(exc, "message", "Unauthorized")}).encode()
        if status == 200:
            body = await render_metrics(svc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body if scope.get("method") != "HEAD" else b""})

    return app


async def serve(
    settings: Settings,
    *,
    executor: Executor | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (or ``shutdown``): drain in-flight requests, then close backends."""
    settings.kcr_data_dir.mkdir(parents=True, exist_ok=True)
    shutdown = trio.Event() if shutdown is None else shutdown
    async with open_services(settings, executor=executor) as svc:
        asgi = build_asgi(svc)
        config = hypercorn_config(settings)
        async with trio.open_nursery() as nursery:

            async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                # Returns once the listeners are closed and in-flight requests drained (Hypercorn
                # cancels what is still running after graceful_timeout).
                await hypercorn_serve(asgi, config, shutdown_trigger=shutdown.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # stop the signal watcher

            nursery.start_soon(_watch_signals, shutdown)
            if (access_lines := log_stream.installed()) is not None:  # batched stderr writes
                await nursery.start(access_lines.run)
            binds = await nursery.start(run_server)
            if svc.metrics is not None and settings.kcr_metrics_port is not None:
                metrics_config = hypercorn_config(settings)
                metrics_config.bind = [f"{settings.api_host}:{settings.kcr_metrics_port}"]
                metrics_config.graceful_timeout = 1.0
                binds = binds + await nursery.start(
                    partial(hypercorn_serve, metrics_asgi(svc), metrics_config, shutdown_trigger=shutdown.wait)
                )
            if svc.ptc is not None and not settings.kcr_ptc_advertise_url:  # where other replicas forward continuations
                svc.ptc.url = binds[0].replace("://0.0.0.0:", "://127.0.0.1:")
            log.info("serving", extra={"binds": binds})
            task_status.started(binds)
            await shutdown.wait()
            log.info("shutting down: draining in-flight requests", extra={"graceful_timeout": settings.graceful_timeout})


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            shutdown.set()
            return


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kcr-trio serve", description="Run the kcr-trio API server.")
    parser.add_argument("--host", help="bind address (API_HOST)")
    parser.add_argument("--port", type=int, help="port (API_PORT)")
    parser.add_argument("--data-dir", help="data directory (KCR_DATA_DIR)")
    return parser.parse_args(argv)


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["api_host"] = args.host
    if args.port is not None:
        overrides["api_port"] = args.port
    if args.data_dir:
        overrides["kcr_data_dir"] = Path(args.data_dir)
    return Settings(**overrides)


def serve_main(argv: list[str]) -> int:
    settings = _settings_from(_parse(argv))
    setup_logging(settings.log_level, settings.log_format)
    try:
        trio.run(serve, settings)  # open_services enters the asyncio bridge when a backend needs it
    except BaseException as exc:  # a refusal to start arrives wrapped in nursery exception groups
        refusal = _startup_refusal(exc)
        if refusal is None:
            raise
        print(f"kcr-trio: refusing to start: {refusal}", file=sys.stderr)
        return 2
    return 0


def _startup_refusal(exc: BaseException) -> str | None:
    """The message of a deliberate start-up refusal (e.g. no working sandbox), if that is what
    ``exc`` is or holds; such a refusal deserves one clear line, not a traceback."""
    from kcr_trio.api.jwt_auth import JwtConfigError
    from kcr_trio.api.profiles import ProfileConfigError
    from kcr_trio.backends.local_executor import SandboxUnavailable

    if isinstance(exc, (SandboxUnavailable, JwtConfigError, ProfileConfigError)):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_refusal(inner)
            if found is not None:
                return found
    return None


def check_main(argv: list[str]) -> int:
    """Validate settings and probe each configured backend once; print a JSON report."""
    settings = _settings_from(_parse(argv))
    setup_logging("WARNING", settings.log_format)

    async def probe() -> dict[str, Any]:
        report: dict[str, Any] = {"ok": True}
        async with open_services(settings) as svc:
            for name, fn in (("sessions", svc.sessions.ping), ("files", svc.files.ping), ("executor", svc.executor.status)):
                try:
                    with trio.fail_after(10):
                        report[name] = await fn()
                except Exception as exc:  # report, don't crash: this is a diagnostic command
                    report["ok"] = False
                    report[name] = {"error": str(exc)}
        return report

    try:
        report = trio.run(probe)
    except BaseException as exc:
        refusal = _startup_refusal(exc)
        if refusal is None:
            raise
        report = {"ok": False, "config": {"error": refusal}}
    json.dump(report, sys.stdout, indent=2, default=str)
    print()
    return 0 if report["ok"] else 1
