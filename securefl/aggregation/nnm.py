"""Nearest-neighbour mixing, a pre-aggregation for any rule (Allouah et al., AISTATS 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from securefl.aggregation.base import Aggregator, as_rows
from securefl.aggregation.geometry import pairwise_sq_distances
from securefl.aggregation.registry import Wrapper

__all__ = ["NNM"]


class NNM(Wrapper):
    """Nearest-neighbour mixing (Allouah et al., "Fixing by mixing: a recipe for optimal
    Byzantine ML under heterogeneity", AISTATS 2023), composed with an inner rule.

    ``y_i = 1/(n - f) sum_{j in N_i} x_j`` where ``N_i`` are the ``n - f`` rows nearest to
    ``x_i`` (``x_i`` itself included); returns ``inner(y, weights)``.  Mixing shrinks the
    heterogeneity the byzantine rows can hide in, so e.g. ``NNM(inner=Krum(...))`` keeps its
    guarantee under non-IID data.  Config: ``rule = "nnm"``, ``num_byzantine = f``,
    ``inner = "krum"`` (or an inline table ``inner = {rule = "trimmed_mean", beta = 0.2}``).
    Precondition: ``n > 2f``, plus the inner rule's own.  Keywords such as ``state=`` are passed
    to the inner rule, so a stateful inner rule stays stateful.
    """

    def __init__(self, *, num_byzantine: int, inner: Aggregator | str | Mapping[str, Any]) -> None:
        self._wrap(inner, num_byzantine, outer="nnm")

    @property
    def min_clients(self) -> int:
        """``n > 2f``, and whatever the inner rule needs."""
        return max(2 * self.num_byzantine + 1, self.inner.min_clients)

    def max_byzantine(self, n: int) -> int:
        """The configured ``f`` when ``n > 2f``, capped by the inner rule's tolerance."""
        if n <= 2 * self.num_byzantine:
            return 0
        return min(self.num_byzantine, self.inner.max_byzantine(n))

    def byzantine_note(self, n: int) -> str:
        if n <= 2 * self.num_byzantine:
            return (f"nnm with num_byzantine = {self.num_byzantine} needs more than "
                    f"{2 * self.num_byzantine} clients per round, the config has {n}")
        return self.inner.byzantine_note(n)

    def mix(self, updates: np.ndarray) -> np.ndarray:
        """The mixed rows ``y`` (float32 ``(n, d)``)."""
        rows = np.asarray(updates)
        n, f = rows.shape[0], self.num_byzantine
        if n < 2 * f + 1:
            raise ValueError(f"NNM with num_byzantine={f} needs n > 2f = {2 * f} updates, "
                             f"got {n}")
        distances = pairwise_sq_distances(rows)
        np.fill_diagonal(distances, -1.0)  # a row is always its own first neighbour
        nearest = np.argsort(distances, axis=1, kind="stable")[:, : n - f]
        mixing = np.zeros((n, n), dtype=np.float32)
        np.put_along_axis(mixing, nearest, np.float32(1.0 / (n - f)), axis=1)
        work = np.float32 if rows.dtype == np.float32 else np.float64
        mixed = mixing.astype(work) @ rows.astype(work, copy=False)
        return mixed.astype(np.float32, copy=False)

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None,
                 **context: Any) -> Any:
        rows, _ = as_rows(updates, weights)
        return self.inner(self.mix(rows), weights, **context)

    def __repr__(self) -> str:
        return f"NNM(num_byzantine={self.num_byzantine}, inner={self.inner!r})"
