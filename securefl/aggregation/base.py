"""The Aggregator seam: ``(n, d)`` rows and optional weights in, one ``(d,)`` row out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Aggregator", "as_rows"]


@runtime_checkable
class Aggregator(Protocol):
    """A pure, stateless aggregation rule (state, if any, is passed in and returned)."""

    #: whether the rule can run on a :class:`~securefl.engine.protection.WeightedSum` alone
    linear: bool

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray: ...


def as_rows(updates: np.ndarray, weights: np.ndarray | None = None, *,
            min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(n, d)`` updates and ``(n,)`` weights; default weights are all ones."""
    rows = np.asarray(updates)
    if rows.ndim != 2:
        raise ValueError(f"updates must have shape (n, d), got {rows.shape}")
    if rows.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} updates, got {rows.shape[0]}")
    if weights is None:
        return rows, np.ones(rows.shape[0])
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (rows.shape[0],):
        raise ValueError(f"weights must have shape ({rows.shape[0]},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return rows, w
