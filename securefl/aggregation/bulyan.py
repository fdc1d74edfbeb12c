"""Bulyan (El Mhamdi et al., ICML 2018)."""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Rule, as_rows
from securefl.aggregation.geometry import pairwise_sq_distances
from securefl.aggregation.krum import check_num_byzantine, krum_ranking
from securefl.aggregation.median import median_of_sorted, sorted_blocks

__all__ = ["Bulyan", "bulyan_selection"]


def bulyan_selection(distances: np.ndarray, num_byzantine: int) -> np.ndarray:
    """The ``theta = n - 2f`` rows chosen by Krum applied repeatedly to the remaining rows.

    Each step scores the ``n'`` remaining rows with ``n' - f - 2`` neighbours, at least 1
    (in the last steps ``n'`` falls to ``2f + 1``, below Krum's own bound).
    """
    n = distances.shape[0]
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(n - 2 * num_byzantine):
        sub = distances[np.ix_(remaining, remaining)]
        neighbours = max(len(remaining) - num_byzantine - 2, 1)
        best = remaining[krum_ranking(sub, neighbours)[0]] if len(remaining) > 1 else remaining[0]
        chosen.append(best)
        remaining.remove(best)
    return np.array(sorted(chosen))


def nearest_to_median_mean(values: np.ndarray, count: int) -> np.ndarray:
    """Per row of a row-sorted ``(b, theta)`` array: mean of the ``count`` values nearest the
    row's median.

    Those values are a contiguous window of the sorted row; the window whose farther end is
    nearest the median is that set (ties go to the lower window).
    """
    theta = values.shape[1]
    median = median_of_sorted(values)[:, None]
    radius = np.maximum(median - values[:, : theta - count + 1], values[:, count - 1:] - median)
    window = np.argmin(radius, axis=1)[:, None] + np.arange(count)
    return np.take_along_axis(values, window, axis=1).sum(axis=1, dtype=np.float64) / count


class Bulyan(Rule):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, "The hidden vulnerability of distributed learning
    in Byzantium", ICML 2018).

    1. Select ``theta = n - 2f`` rows by Krum applied repeatedly: pick Krum's row among the
       remaining ones, remove it, repeat.
    2. For every coordinate ``j``: with ``m_j`` the median of the selected rows' values, return
       the mean of the ``beta = theta - 2f`` selected values nearest to ``m_j``.

    Precondition: ``n >= 4f + 3``.  Weights are validated but not used.
    """

    linear = False

    def __init__(self, *, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    @property
    def min_clients(self) -> int:
        """``n >= 4f + 3``."""
        return 4 * self.num_byzantine + 3

    def max_byzantine(self, n: int) -> int:
        """The configured ``f`` when ``n >= 4f + 3`` (El Mhamdi et al. 2018), else 0."""
        return self.num_byzantine if n >= self.min_clients else 0

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, _ = as_rows(updates, weights)
        n, f = rows.shape[0], self.num_byzantine
        if n < self.min_clients:
            raise ValueError(f"Bulyan with num_byzantine={f} needs n >= 4f + 3 = {4 * f + 3} "
                             f"updates, got {n}")
        chosen = bulyan_selection(pairwise_sq_distances(rows), f)
        beta = len(chosen) - 2 * f
        out = np.empty(rows.shape[1], dtype=np.float32)
        for cols, values in sorted_blocks(rows, chosen):
            out[cols] = nearest_to_median_mean(values, beta)
        return out

    def __repr__(self) -> str:
        return f"Bulyan(num_byzantine={self.num_byzantine})"
