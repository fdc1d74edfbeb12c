"""Weighted mean (FedAvg)."""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Rule, as_rows, weighted_sum

__all__ = ["FedAvg"]


class FedAvg(Rule):
    """FedAvg (McMahan et al., AISTATS 2017): ``sum_i w_i x_i / sum_i w_i``.

    With ``weights=None`` every row weighs the same.  Linear, so it is the one rule that
    also runs on a secure-aggregation or HE sum.
    """

    linear = True

    def byzantine_note(self, n: int) -> str:
        return ("fedavg averages the updates: one byzantine client moves the result "
                "arbitrarily far (Blanchard et al. 2017)")

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, w = as_rows(updates, weights)
        return (weighted_sum(rows, w) / w.sum()).astype(np.float32)

    def __repr__(self) -> str:
        return "FedAvg()"
