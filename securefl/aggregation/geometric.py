"""Geometric median by smoothed Weiszfeld (RFA; Pillutla, Kakade, Harchaoui 2022)."""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Rule, as_rows
from securefl.aggregation.geometry import affine_sq_norms, centred_gram, combine_rows

__all__ = ["GeometricMedian", "weiszfeld_coefficients"]


def weiszfeld_coefficients(gram: np.ndarray, alpha: np.ndarray, *, smoothing: float,
                           max_iterations: int, tolerance: float) -> np.ndarray:
    """Coefficients ``c`` (summing to 1) of ``z = sum_i c_i x_i``, the smoothed Weiszfeld point.

    Every iterate is an affine combination of the rows, so distances come from ``G`` alone
    (:func:`affine_sq_norms`) and each iteration costs ``O(n^2)``, not ``O(n d)``.  Starts at
    the weighted medoid (the row with the least objective) and stops when a step moves ``z``
    by at most ``tolerance`` times the median distance from ``z`` to the rows.

    Rows within ``smoothing`` of ``z`` count as *at* ``z`` (weight ``eta``), and the step is
    Vardi & Zhang's ("The multivariate L1-median and associated data depth", PNAS 2000):
    with ``beta_i = alpha_i / ||x_i - z||`` over the other rows, ``T = sum beta_i x_i / sum
    beta_i`` and ``r = ||sum beta_i (x_i - z)||``, ``z <- (1 - min(1, eta / r)) T + min(1,
    eta / r) z``.  So ``z`` stays at a point holding rows exactly when ``r <= eta``, the
    first-order condition of the median at a point of mass ``eta``; the plain step, which
    gives those rows ``alpha_i / smoothing``, would stay at the medoid, or at any point held
    by several identical rows, whether or not it is the median.  Without rows at ``z`` it
    is the plain Weiszfeld step.
    """
    alpha = alpha / alpha.sum()
    norms = np.diag(gram)
    distances = np.sqrt(np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0))
    coefficients = np.zeros(len(alpha))
    coefficients[np.argmin(distances @ alpha)] = 1.0
    for _ in range(max_iterations):
        gaps = np.sqrt(affine_sq_norms(gram, coefficients))
        near = gaps <= smoothing
        if near.all():
            break
        beta = np.where(near, 0.0, alpha / np.maximum(gaps, smoothing))
        eta = float(alpha[near].sum())
        target = beta / beta.sum()
        if eta > 0.0:  # r = ||sum beta_i (x_i - z)||, a zero-sum combination: v^T G v
            pull = beta - beta.sum() * coefficients
            r = np.sqrt(max(float(pull @ gram @ pull), 0.0))
            stay = 1.0 if r <= eta else eta / r
            target = (1.0 - stay) * target + stay * coefficients
        step = target - coefficients
        coefficients = target
        moved = np.sqrt(max(float(step @ gram @ step), 0.0))
        if moved <= tolerance * float(np.median(gaps)):
            break
    return coefficients


class GeometricMedian(Rule):
    """Geometric median, RFA (Pillutla et al., "Robust aggregation for federated learning",
    IEEE Trans. Signal Processing 2022), computed by the smoothed Weiszfeld algorithm.

    ``z = argmin_z sum_i alpha_i ||z - x_i||`` with ``alpha_i = w_i / sum w``, by iterating
    ``beta_i = alpha_i / ||z - x_i||``, ``z <- sum_i beta_i x_i / sum_i beta_i``, with Vardi &
    Zhang's step where rows lie within ``nu = smoothing`` of ``z``
    (:func:`weiszfeld_coefficients`), from the weighted medoid, until ``z`` moves by less than
    ``tolerance`` times its median distance to the rows, or ``max_iterations``.  Rows whose
    distance overflows get weight 0.  Precondition: ``n >= 1``.  Breakdown point: half the
    total weight (RFA weights by example counts, which clients report).
    """

    linear = False

    def max_byzantine(self, n: int) -> int:
        """``f < n / 2`` (Pillutla et al. 2022)."""
        return (n - 1) // 2

    def __init__(self, *, smoothing: float = 1e-6, max_iterations: int = 500,
                 tolerance: float = 1e-7) -> None:
        if not (np.isfinite(smoothing) and smoothing > 0):
            raise ValueError(f"smoothing must be > 0, got {smoothing}")
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
                or max_iterations < 1:
            raise ValueError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
        if not (np.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.smoothing = float(smoothing)
        self.max_iterations = max_iterations
        self.tolerance = float(tolerance)

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, w = as_rows(updates, weights)
        gram, far = centred_gram(rows)
        keep = np.flatnonzero(~far)
        coefficients = np.zeros(rows.shape[0])
        coefficients[keep] = weiszfeld_coefficients(
            gram[np.ix_(keep, keep)], w[keep], smoothing=self.smoothing,
            max_iterations=self.max_iterations, tolerance=self.tolerance)
        return combine_rows(rows, coefficients)

    def __repr__(self) -> str:
        return (f"GeometricMedian(smoothing={self.smoothing}, "
                f"max_iterations={self.max_iterations}, tolerance={self.tolerance})")
