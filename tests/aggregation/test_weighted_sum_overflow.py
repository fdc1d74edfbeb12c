"""``weighted_sum`` never returns an overflowed aggregate (finite 1e300 weight x 1e10 update)."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.aggregation.base import as_rows, weighted_sum


def test_a_huge_weight_with_a_representable_sum_does_not_overflow():
    rows = np.array([[1e-10, 2e-10], [0.0, 0.0]], dtype=np.float64)
    out = weighted_sum(rows, np.array([1e300, 1.0]))
    np.testing.assert_allclose(out, [1e290, 2e290], rtol=1e-12)


def test_an_overflowing_sum_raises_instead_of_returning_inf():
    rows = np.full((2, 3), 1e10, dtype=np.float32)
    with pytest.raises(ValueError, match="overflows"):
        weighted_sum(rows, np.array([1e300, 1.0]))


def test_scaling_is_exact():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 9000)).astype(np.float32)
    w = rng.uniform(1, 1000, size=5)
    assert np.array_equal(weighted_sum(rows, w), w @ rows.astype(np.float64))


def test_weights_whose_sum_overflows_are_refused():
    with pytest.raises(ValueError, match="finite sum"):
        as_rows(np.ones((2, 2)), np.array([1e308, 1e308]))
