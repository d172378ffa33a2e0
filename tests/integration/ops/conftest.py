"""Fixtures of the operations tests; the helpers live in ``tests/support/ops.py``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.support.ops import LogCapture


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture.handler)
    root.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.removeHandler(capture.handler)
        root.setLevel(old_level)
