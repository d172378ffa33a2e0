"""The HTTP edge's handlers are module-level functions that tools and tests can name and import
(issue 15: no closure holds them), and building the app registers exactly the expected routes."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, cast

from kcr_trio.api import exec_http, files_http, hooks, ops_http
from kcr_trio.api.app_factory import create_app
from kcr_trio.api.auth import Authenticator
from kcr_trio.api.services import Services
from tests.support.server import make_settings

# endpoint -> handler; the endpoint names (and so the OpenAPI operationIds) are the ones the
# app had before the split.
HANDLERS = {
    "exec_route": exec_http.exec_route,
    "upload": files_http.upload,
    "upload_batch": files_http.upload_batch,
    "list_files": files_http.list_files,
    "freshness": files_http.freshness,
    "download": files_http.download,
    "download_options": files_http.download_options,
    "delete_file": files_http.delete_file,
    "health": ops_http.health,
    "ready": ops_http.ready,
    "metrics": ops_http.metrics,
    "openapi": ops_http.openapi,
    "docs": ops_http.docs,
}


def build(tmp_path: Path, **settings: Any) -> Any:
    # No backend is touched while the app is built: placeholders are enough.
    unused = cast(Any, object())
    svc = Services(
        settings=make_settings(tmp_path, **settings), sessions=unused, files=unused, executor=unused,
        exec_service=unused, auth=Authenticator(["k"]), spool_dir=tmp_path, warnings=[],
        metrics=unused,
    )
    return create_app(svc)


def test_every_handler_is_a_module_level_function(tmp_path: Path) -> None:
    app = build(tmp_path, enable_docs=True)
    views = {name: fn for name, fn in app.view_functions.items() if name != "static"}
    assert views == HANDLERS
    for fn in views.values():
        assert "<locals>" not in fn.__qualname__
        assert getattr(importlib.import_module(fn.__module__), fn.__qualname__) is fn


def test_hooks_are_module_level_functions(tmp_path: Path) -> None:
    app = build(tmp_path)
    assert hooks.content_type_and_auth in app.before_request_funcs[None]
    assert hooks.response_headers in app.after_request_funcs[None]
    handlers = {exc: fn for by_code in app.error_handler_spec[None].values() for exc, fn in by_code.items()}
    assert set(handlers.values()) >= {hooks.api_error, hooks.http_error, hooks.unexpected_error}


def test_optional_routes_follow_the_settings(tmp_path: Path) -> None:
    app = build(tmp_path, enable_docs=False, kcr_metrics_port=9100)
    assert {"metrics", "openapi", "docs"}.isdisjoint(app.view_functions)
    assert "exec_route" in app.view_functions


def test_the_closure_module_is_gone() -> None:
    root = Path(__file__).resolve().parents[2] / "kcr_trio" / "api"
    assert not (root / "routes.py").exists()
