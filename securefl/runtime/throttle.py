"""Repeated warnings about one site, rate-limited: one line per (site, kind) per interval.

A site that floods the server with 5,000 bad frames gets one WARNING line per second (the
default ``[network] warning_interval``), each saying how many similar lines were suppressed
since the previous one, instead of 5,000 lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Throttle"]

_MAX_KEYS = 4096


class Throttle:
    """``warning(site, kind, fmt, *args)`` logs at most once per ``interval`` seconds per key."""

    def __init__(self, logger: logging.Logger, *, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def warning(self, site: str, kind: str, fmt: str, *args: object) -> bool:
        """Log (True) or count as suppressed (False)."""
        key, now = (site, kind), self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if len(self._last) >= _MAX_KEYS:  # forget quiet keys: memory stays bounded
                for stale in [k for k, t in self._last.items() if now - t >= self.interval]:
                    del self._last[stale]
                    self._suppressed.pop(stale, None)
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fmt += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.warning(fmt, *args)
        return True
