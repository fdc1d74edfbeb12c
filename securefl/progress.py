"""Progress on long work: a ``rich`` bar on a terminal, INFO log lines elsewhere.

A bar is drawn only when stderr is a terminal and securefl logs at INFO (not under ``-q``):
CI logs and redirected output get the plain INFO lines instead, never a bar.  While a bar is
shown, log records go above it (through rich's stderr proxy) instead of tearing it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Progress", "bars_enabled", "progress"]

#: the bar on screen, if any: rich shows one live display at a time
_shown: list[Any] = []


def bars_enabled() -> bool:
    """Whether a bar may be drawn: stderr is a terminal and INFO is not silenced (``-q``)."""
    return sys.stderr.isatty() and logging.getLogger("securefl").isEnabledFor(logging.INFO)


class Progress:
    """One task's progress: ``advance`` moves the bar, or logs one INFO line without one."""

    def __init__(self, description: str, total: float | None, *, log: logging.Logger,
                 bar: Any = None, task: Any = None, completed: float = 0) -> None:
        self.description, self.total, self.completed = description, total, completed
        self._log, self._bar, self._task = log, bar, task

    @property
    def drawn(self) -> bool:
        return self._bar is not None

    def advance(self, steps: float = 1, *, status: str = "", log: bool = True) -> None:
        """Move ``steps`` ahead; ``status`` is shown beside the bar or logged at INFO
        (``log=False``: only the bar, for updates too frequent for a log)."""
        self.completed += steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, status=status)
        elif log:
            done = (f"{self.completed:g}/{self.total:g}" if self.total is not None
                    else f"{self.completed:g}")
            self._log.info("%s %s%s", self.description, done, f": {status}" if status else "")

    def update(self, *, completed: float | None = None, total: float | None = None,
               status: str = "") -> None:
        """Set the bar's position or total (no log line: the caller logs what matters)."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, total=self.total,
                             status=status)


@contextmanager
def progress(description: str, total: float | None, *, log: logging.Logger,
             completed: float = 0, transient: bool = False) -> Iterator[Progress]:
    """A :class:`Progress` for the block; with a bar when :func:`bars_enabled` and no other
    bar is shown (a nested one, like the server's wait inside its rounds, logs instead)."""
    if not bars_enabled() or _shown:
        yield Progress(description, total, log=log, completed=completed)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
              TimeElapsedColumn(), TextColumn("{task.fields[status]}"), transient=transient,
              console=Console(stderr=True))
    with bar:
        handlers = _redirect_logging(sys.stderr)
        _shown.append(bar)
        try:
            task = bar.add_task(description, total=total, completed=int(completed), status="")
            yield Progress(description, total, log=log, bar=bar, task=task, completed=completed)
        finally:
            _shown.remove(bar)
            _redirect_logging(None, handlers)


def _redirect_logging(stream: Any, restore: dict[logging.StreamHandler[Any], Any] | None = None
                      ) -> dict[logging.StreamHandler[Any], Any]:
    """Point the stderr log handlers at rich's proxy (which prints above the bar), or back."""
    if restore is not None:
        for handler, old in restore.items():
            handler.setStream(old)
        return {}
    moved: dict[logging.StreamHandler[Any], Any] = {}
    for candidate in logging.getLogger().handlers:
        if (isinstance(candidate, logging.StreamHandler)
                and candidate.stream in (sys.__stderr__,
                                         getattr(stream, "rich_proxied_file", None))):
            moved[candidate] = candidate.setStream(stream)
    return moved
