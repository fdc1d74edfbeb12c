"""Fixtures of the privacy tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats


def _theorem_p_value(scores: np.ndarray, included: np.ndarray, *, eps: float, delta: float,
                     fractions: tuple[float, ...]) -> float:
    """Steinke, Nasr & Jagielski 2023, Thm. 5.2, evaluated directly: the smallest over guess
    counts r = 2 floor(f m / 2) (v correct among the top and bottom r / 2 scores) of
    P[Bin(r, p) >= v] + 2 m delta max_i (F(v - 1) - F(v - i - 1)) / i,
    p = e^eps / (1 + e^eps), F the binomial CDF."""
    m = len(scores)
    ranked = included[np.argsort(scores, kind="stable")]
    p = math.exp(eps) / (1 + math.exp(eps))
    values = []
    for fraction in fractions:
        k = max(1, int(fraction * m / 2))
        v, r = int(ranked[m - k:].sum() + (k - ranked[:k].sum())), 2 * k
        i = np.arange(1, v + 1)
        alpha = np.max((stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i)
        values.append(1 - stats.binom.cdf(v - 1, r, p) + 2 * m * delta * alpha)
    return min(values)


@pytest.fixture
def theorem_p_value() -> Callable[..., float]:
    """The one-run theorem's p-value, computed independently of securefl.privacy.audit."""
    return _theorem_p_value
