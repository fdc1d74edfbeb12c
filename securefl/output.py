"""What a run leaves behind, written so that nothing is ever half-written.

* files: :func:`atomic_write` (a temporary file, fsync, rename, fsync of the folder),
  :func:`write_json`, :func:`append_jsonl`, :func:`save_model` (safetensors: no code on load);
* plots: :func:`pyplot` (matplotlib on the headless Agg backend) and :func:`save_figure`;
* the run directory: :func:`run_directory` (never mixes two runs), :func:`summary`,
  :func:`plot_accuracy`, and :func:`failure`, the one-line verdict of a run that did not do
  what was asked.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config
from securefl.engine.history import History
from securefl.errors import ConfigError

__all__ = ["append_jsonl", "atomic_write", "failure", "plot_accuracy", "pyplot",
           "run_directory", "save_figure", "save_model", "summary", "write_json"]


def atomic_write(path: str | Path, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a same-directory temp file (created with
    ``mode`` when given, e.g. 0o600 for a key), fsync, rename, then fsync of the directory so
    the rename itself survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrite a JSON-lines file with ``rows`` atomically (files stay small: one row a round)."""
    return atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_model(path: str | Path, tensors: dict[str, np.ndarray],
               metadata: dict[str, str] | None = None) -> Path:
    """Save parameters as safetensors (no code on load), atomically."""
    from safetensors.numpy import save

    return atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                   metadata=metadata))


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


def summary(config: Config, history: History, setup: float, total: float) -> dict[str, Any]:
    """``summary.json``: the run's outcome and settings in one flat record."""
    final = history.final
    accuracies = [a for a in history.metric("accuracy") if a is not None]
    return {
        "name": config.run.name, "rounds": len(history.rounds),
        "final_accuracy": final.accuracy if final else None,
        "final_loss": final.loss if final else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "protection": config.protection.kind, "aggregation": config.aggregation.rule,
        "privacy": config.privacy.mode, "seed": config.run.seed,
        "aborted_rounds": [r.round for r in history.rounds if r.aborted],
        "stopped": history.stopped,
        "setup_seconds": round(setup, 4), "total_seconds": round(total, 4),
    }


def plot_accuracy(history: History, path: Path, *, title: str) -> None:
    """``accuracy.png``: test (and federated) accuracy per round, integer round ticks."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    rounds = [r.round for r in history.rounds]
    for name, label in (("accuracy", "test accuracy"), ("federated_accuracy", "federated")):
        values = [np.nan if v is None else v for v in history.metric(name)]
        if not all(np.isnan(values)):
            ax.plot(rounds, values, marker="o", markersize=3, label=label)
    ax.set(xlabel="round", ylabel="accuracy", title=title, ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def failure(history: History) -> str | None:
    """Why a finished run did not do what was asked (no round aggregated anything), or None."""
    if any(r.clients and not r.aborted for r in history.rounds):
        return None
    reasons = sorted({r.aborted or next(iter(r.declined.values()), "no usable update")
                      for r in history.rounds})
    return (f"none of the {len(history.rounds)} rounds aggregated an update "
            f"({'; '.join(reasons)[:300]})")


def run_directory(out: str | None, *, name: str, overwrite: bool) -> Path:
    """The run directory: ``--out`` or ``runs/<name>-<UTC timestamp>``; an existing
    non-empty directory is refused unless ``overwrite``, so two runs never mix their files."""
    if out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{name}-{stamp}"
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: already holds files (an earlier run?); choose "
                          "another directory or pass --overwrite")
    return path
