"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Rule, as_rows
from securefl.aggregation.geometry import combine_rows, pairwise_sq_distances

__all__ = ["Krum", "MultiKrum", "check_num_byzantine", "krum_ranking", "krum_scores"]


def check_num_byzantine(num_byzantine: int) -> int:
    """Validate the assumed number of byzantine rows ``f`` (an int ``>= 0``)."""
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int | np.integer):
        raise TypeError(f"num_byzantine must be an int, got {num_byzantine!r}")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    return int(num_byzantine)


def _check_bound(name: str, num_rows: int, num_byzantine: int) -> None:
    if num_rows < 2 * num_byzantine + 3:
        raise ValueError(f"{name} with num_byzantine={num_byzantine} needs n > 2f + 2 = "
                         f"{2 * num_byzantine + 2} updates, got {num_rows}")


def krum_scores(distances: np.ndarray, neighbours: int) -> np.ndarray:
    """``score(i) = sum of the `neighbours` smallest D[i, j], j != i`` (squared distances)."""
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.sort(others, axis=1)[:, :neighbours]
    return nearest.sum(axis=1)


def krum_ranking(distances: np.ndarray, neighbours: int) -> np.ndarray:
    """Row indices by increasing Krum score.

    Exact ties (e.g. the closest pair when ``neighbours = 1``) are broken by the sum of squared
    distances to all rows, so the choice depends on the rows and not on their order.
    """
    scores = krum_scores(distances, neighbours)
    spread = distances.sum(axis=1)
    return np.lexsort((spread, scores))


class Krum(Rule):
    """Krum (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
    descent", NeurIPS 2017).

    ``score(i) = sum_{j in N_i} ||x_i - x_j||^2`` where ``N_i`` are the ``n - f - 2`` rows
    nearest to ``x_i`` (the paper's count; some libraries use ``n - f - 1``); returns
    ``x_{argmin score}``.  Precondition: ``n > 2f + 2``.  Weights are validated but not used.
    """

    linear = False

    def __init__(self, *, num_byzantine: int) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)

    @property
    def min_clients(self) -> int:
        """The smallest ``n`` with ``n > 2f + 2``."""
        return 2 * self.num_byzantine + 3

    def max_byzantine(self, n: int) -> int:
        """The configured ``f`` when ``n > 2f + 2``, else 0 (Blanchard et al. 2017)."""
        return self.num_byzantine if n >= self.min_clients else 0

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, _ = as_rows(updates, weights)
        _check_bound("Krum", rows.shape[0], self.num_byzantine)
        distances = pairwise_sq_distances(rows)
        best = krum_ranking(distances, rows.shape[0] - self.num_byzantine - 2)[0]
        return np.array(rows[best], dtype=np.float32)

    def __repr__(self) -> str:
        return f"Krum(num_byzantine={self.num_byzantine})"


class MultiKrum(Rule):
    """Multi-Krum (Blanchard et al., NeurIPS 2017, Section 5).

    Scores every row once as :class:`Krum` does (``n - f - 2`` neighbours) and returns the
    unweighted mean of the ``m`` rows with the lowest scores (``num_selected = m``, by default
    ``n - f``).  Preconditions: ``n > 2f + 2`` and ``1 <= m <= n - f`` (more than ``n - f``
    rows would always include a byzantine one).  Weights are validated but not used.
    """

    linear = False

    def __init__(self, *, num_byzantine: int, num_selected: int | None = None) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        if num_selected is not None:
            if isinstance(num_selected, bool) or not isinstance(num_selected, int | np.integer):
                raise TypeError(f"num_selected must be an int, got {num_selected!r}")
            if num_selected < 1:
                raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        self.num_selected = None if num_selected is None else int(num_selected)

    @property
    def min_clients(self) -> int:
        """The smallest ``n`` with ``n > 2f + 2`` and ``m <= n - f``."""
        return max(2 * self.num_byzantine + 3, (self.num_selected or 0) + self.num_byzantine)

    def max_byzantine(self, n: int) -> int:
        """The configured ``f`` when the preconditions hold at ``n``, else 0."""
        return self.num_byzantine if n >= self.min_clients else 0

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, _ = as_rows(updates, weights)
        n, f = rows.shape[0], self.num_byzantine
        _check_bound("MultiKrum", n, f)
        m = n - f if self.num_selected is None else self.num_selected
        if m > n - f:
            raise ValueError(f"MultiKrum num_selected={m} must be <= n - f = {n - f}")
        chosen = krum_ranking(pairwise_sq_distances(rows), n - f - 2)[:m]
        coefficients = np.zeros(n)
        coefficients[chosen] = 1.0 / m
        return combine_rows(rows, coefficients)

    def __repr__(self) -> str:
        return f"MultiKrum(num_byzantine={self.num_byzantine}, num_selected={self.num_selected})"
