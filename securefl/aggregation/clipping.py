"""Clipping rules: CenteredClipping (stateful across rounds) and NormBound."""

from __future__ import annotations

import math
from typing import overload

import numpy as np

from securefl.aggregation.base import Rule, as_rows
from securefl.aggregation.geometry import (
    affine_sq_norms,
    centred_gram,
    combine_rows,
    row_statistics,
)
from securefl.aggregation.median import Median

__all__ = ["CenteredClipping", "NormBound"]

_NO_STATE = object()


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class CenteredClipping(Rule):
    """Centered clipping (Karimireddy, He, Jaggi, "Learning from history for Byzantine robust
    optimization", ICML 2021).

    Starting from ``v_0`` (the previous round's aggregate), ``iterations = L`` times:
    ``v <- v + 1/n sum_i (x_i - v) min(1, tau / ||x_i - v||)``.  The result is bounded: each
    iteration moves ``v`` by at most ``tau``.  The paper uses ``L = 1`` and carries ``v`` across
    rounds; that history is what defeats attacks that stay small in every single round.

    State, passed in and returned (the server's ``stateful`` protocol): ``rule(rows, w,
    state=v)`` returns ``(aggregate, new_state)``, with ``new_state`` the aggregate.  On the
    first round ``state=None``; then, and when called without ``state=`` (the plain
    Aggregator call, which returns only the aggregate), ``v_0`` is the coordinate-wise median:
    a zero start would shrink every honest update by up to ``L tau``.  Weights are validated
    but not used (the paper averages uniformly).  Precondition: ``n >= 1``.
    """

    linear = False
    stateful = True

    def max_byzantine(self, n: int) -> int:
        """Counted conservatively at ``delta_max = 0.1`` of the round (the robustness constant
        of Karimireddy et al., ICLR 2022)."""
        return math.floor(0.1 * n + 1e-9)

    def __init__(self, *, tau: float = 1.0, iterations: int = 1) -> None:
        self.tau = _positive("tau", tau)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        self.iterations = iterations

    @overload
    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray: ...

    @overload
    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None, *,
                 state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]: ...

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None, *,
                 state: object = _NO_STATE) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        rows, _ = as_rows(updates, weights)
        start = None if state is _NO_STATE else state
        result = self._clip(rows, start)
        return result if state is _NO_STATE else (result, result.copy())

    def _clip(self, rows: np.ndarray, state: object) -> np.ndarray:
        n, dimension = rows.shape
        if state is None:
            centre = Median()(rows)
        else:
            centre = np.asarray(state, dtype=np.float32)
            if centre.shape != (dimension,) or not np.isfinite(centre).all():
                raise ValueError(f"state must be a finite ({dimension},) vector (the previous "
                                 f"aggregate) or None, got shape {centre.shape}")
        gram, far = centred_gram(rows, extra=centre)
        if far[n]:
            raise ValueError("state is too far from every update (its distance overflows)")
        keep = np.flatnonzero(~far)  # the centre, point n, is last
        sub = gram[np.ix_(keep, keep)]
        is_row = keep < n
        coefficients = np.zeros(len(keep))
        coefficients[-1] = 1.0  # v = v_0
        for _ in range(self.iterations):
            gaps = np.sqrt(affine_sq_norms(sub, coefficients))[is_row]
            with np.errstate(divide="ignore"):
                steps = np.where(gaps > 0, np.minimum(1.0, self.tau / gaps), 1.0) / n
            coefficients *= 1.0 - steps.sum()
            coefficients[is_row] += steps
        on_rows = np.zeros(n)
        on_rows[keep[is_row]] = coefficients[is_row]
        result = combine_rows(rows, on_rows) + np.float32(coefficients[-1]) * centre
        return result.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"CenteredClipping(tau={self.tau}, iterations={self.iterations})"


class NormBound(Rule):
    """Norm bounding (Sun et al., "Can you really backdoor federated learning?", 2019).

    ``x_i <- x_i min(1, M / ||x_i||)``, then the weighted mean
    ``sum_i w_i x_i / sum_i w_i``.  The output norm is at most ``M``.  Weights are used (each
    client's influence stays at most ``w_i M / sum w``).  Precondition: ``n >= 1``.
    """

    linear = False

    def byzantine_note(self, n: int) -> str:
        return ("norm_bound clips then averages: f byzantine clients still move the mean "
                "by up to f * max_norm / n every round")

    def __init__(self, *, max_norm: float) -> None:
        self.max_norm = _positive("max_norm", max_norm)

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        rows, w = as_rows(updates, weights)
        norms = np.sqrt(row_statistics(rows)[0])
        with np.errstate(divide="ignore"):
            scale = np.where(norms > self.max_norm, self.max_norm / norms, 1.0)
        return combine_rows(rows, w * scale / w.sum())

    def __repr__(self) -> str:
        return f"NormBound(max_norm={self.max_norm})"
