"""What a run leaves behind: the run directory it writes into, its summary, its accuracy
plot, and the one-line verdict of a run that did not do what was asked."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config
from securefl.engine.history import History
from securefl.errors import ConfigError
from securefl.plots import pyplot, save_figure

__all__ = ["failure", "plot_accuracy", "run_directory", "summary"]


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
