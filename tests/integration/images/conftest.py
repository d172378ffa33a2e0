"""Fixtures for the container image tests: podman (skipped only when it cannot run at all) and the
images scripts/build-images.sh builds, built once per session and cached by podman across runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support import containers
from tests.support.container_pod import RunningContainer

# What CI builds in every run (the other language images are built by the slow tests).
CORE_TARGETS = ("base", "api", "py", "node", "bash")


@pytest.fixture(scope="session")
def podman_ready() -> None:
    reason = containers.unavailable_reason()
    if reason:
        pytest.skip(f"container image tests need podman: {reason}")


@pytest.fixture(scope="session")
def core_images(podman_ready: None) -> str:
    """Build (or find up to date) the base, API, py, node and bash images; the build log."""
    return containers.build_images(*CORE_TARGETS)


def wait_ready(c: RunningContainer, path: str = "/ready", timeout: float = 60.0) -> httpx.Response:
    """Poll ``path`` until it answers 200 (the container is still starting until then)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(c.url + path, timeout=5)
            if last.status_code == 200:
                return last
        except httpx.HTTPError as exc:
            last = exc
        state = containers.podman("inspect", "-f", "{{.State.Running}}", c.name, check=False).stdout.strip()
        if state != "true":
            break
        time.sleep(0.1)
    raise AssertionError(f"{c.name} never answered 200 on {path} (last: {last!r}); logs:\n{c.logs()[-3000:]}")


Check = Callable[[RunningContainer], None]
