"""A tiny rate gate for repeated log messages (pure logic: a clock and a timestamp)."""

from __future__ import annotations

import time


class Throttle:
    """Lets a repeated message through at most once every ``seconds``.

    A store outage fails every request; logging each failure would bury the one line that says
    what broke.
    """

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.seconds:
            self._last = now
            return True
        return False
