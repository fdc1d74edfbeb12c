"""Headless plotting shared by every report: the Agg backend and atomic PNG writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from securefl.rundir import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, *, dpi: int = 110, **options: Any) -> Path:
    """Render ``figure`` to PNG, write it atomically to ``path`` and close the figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, **options)
    pyplot().close(figure)
    return atomic_write(path, buffer.getvalue())
