"""Each rule against its paper's formula: hand-computed cases and naive re-implementations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import trim_mean

from securefl.aggregation import (
    NNM,
    Bulyan,
    CenteredClipping,
    FedAvg,
    FLTrust,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
    geometry,
    median,
)
from securefl.aggregation.bulyan import bulyan_selection
from securefl.aggregation.krum import krum_scores

# seven scalars, f = 1: Krum uses n - f - 2 = 4 neighbours
LINE = np.array([0.0, 1, 2, 4, 7, 8, 9])[:, None]


@pytest.fixture
def many_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(median, "SORT_BLOCK_ELEMENTS", 64)


def naive_distances(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)


def naive_krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    dist = naive_distances(rows)
    n = len(rows)
    return np.array([np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)])


# ---------------------------------------------------------------- Krum / Multi-Krum
def test_krum_scores_by_hand() -> None:
    # row 2 (value 2): squared distances 4, 1, 4, 25, 36, 49 -> 1 + 4 + 4 + 25 = 34
    # row 3 (value 4): 16, 9, 4, 9, 16, 25 -> 4 + 9 + 9 + 16 = 38
    scores = krum_scores(naive_distances(LINE), 4)
    np.testing.assert_array_equal(scores, [70, 47, 34, 38, 39, 54, 79])
    assert Krum(num_byzantine=1)(LINE)[0] == 2.0
    # the n - f - 1 count some libraries use would pick the value 4 (54 < 70) instead
    assert np.argmin(krum_scores(naive_distances(LINE), 5)) == 3


def test_multikrum_by_hand() -> None:
    # the three lowest scores are 34, 38, 39: values 2, 4, 7
    np.testing.assert_allclose(MultiKrum(num_byzantine=1, num_selected=3)(LINE), [13 / 3],
                               rtol=1e-6)
    # default m = n - f = 6 drops only the worst score (79, the value 9)
    np.testing.assert_allclose(MultiKrum(num_byzantine=1)(LINE), [22 / 6], rtol=1e-6)


@pytest.mark.usefixtures("many_blocks")
@pytest.mark.parametrize("seed", range(4))
def test_krum_matches_naive_with_large_offset(seed: int) -> None:
    """float32 rows with an offset 1e5 times their spread: the centred Gram stays exact."""
    rng = np.random.default_rng(seed)
    rows = (1e3 + 1e-2 * rng.standard_normal((15, 400))).astype(np.float32)
    rows[:3] += rng.normal(0, 0.05, size=(3, 400)).astype(np.float32)
    expected = naive_krum_scores(rows, 3)
    got = krum_scores(geometry.pairwise_sq_distances(rows), 15 - 3 - 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(Krum(num_byzantine=3)(rows), rows[np.argmin(expected)])


@pytest.mark.usefixtures("many_blocks")
def test_distances_accurate_next_to_huge_rows() -> None:
    rng = np.random.default_rng(0)
    rows = (0.5 + 0.1 * rng.standard_normal((12, 300))).astype(np.float32)
    rows[:3] = (1e6 * rng.standard_normal((3, 300))).astype(np.float32)
    exact = naive_distances(rows)
    got = geometry.pairwise_sq_distances(rows)
    np.testing.assert_allclose(got[3:, 3:], exact[3:, 3:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:3], exact[:3], rtol=1e-4)


def test_origin_central_only_on_the_sample_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that mimics the honest centre on the first coordinates and is far elsewhere
    must not stay the float32 centring origin (honest distances would drown in rounding)."""
    monkeypatch.setattr(geometry, "ORIGIN_SAMPLE", 64)
    monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 64 * 12)
    rng = np.random.default_rng(1)
    rows = (1e3 + 1e-2 * rng.standard_normal((12, 600))).astype(np.float32)
    rows[:, :64] = 1e3 + rng.standard_normal((12, 64))
    rows[0, :64] = 1e3  # the centre of the honest rows on the sample: chosen as origin
    rows[0, 64:] = 1e5
    sample = rows[:, :64].astype(np.float64)
    assert geometry._central_row(naive_distances(sample)) == 0
    exact = naive_distances(rows)
    got = geometry.pairwise_sq_distances(rows)
    np.testing.assert_allclose(got[1:, 1:], exact[1:, 1:], rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- Median / TrimmedMean
def test_median_by_hand() -> None:
    np.testing.assert_array_equal(Median()(np.array([[1.0], [5], [3]])), [3.0])
    np.testing.assert_array_equal(Median()(np.array([[1.0], [2], [10], [4]])), [3.0])


def test_trimmed_mean_by_hand() -> None:
    # beta = 0.2, n = 5: k = 1 value dropped at each end -> mean(2, 3, 4), mean(0, 5, 7)
    rows = np.array([[1.0, 10], [2, -5], [3, 0], [4, 5], [100, 7]])
    np.testing.assert_allclose(TrimmedMean(beta=0.2)(rows), [3.0, 4.0])
    np.testing.assert_allclose(TrimmedMean(beta=0.0)(rows), rows.mean(axis=0))


@pytest.mark.usefixtures("many_blocks")
@pytest.mark.parametrize("n", [9, 10, 21])
def test_median_and_trimmed_mean_match_numpy_and_scipy(n: int) -> None:
    rows = np.random.default_rng(n).standard_normal((n, 333)).astype(np.float32)
    np.testing.assert_array_equal(Median()(rows), np.median(rows, axis=0))
    np.testing.assert_allclose(TrimmedMean(beta=0.2)(rows), trim_mean(rows, 0.2, axis=0),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Bulyan
def test_bulyan_by_hand() -> None:
    # n = 7, f = 1: theta = 5 rows by repeated Krum, then beta = 3 values nearest the median.
    # picks: value 2 (score 34); 7 (3 neighbours: 14); 1 (2 neighbours: 10); 8 and 9 tie at
    # 1 neighbour (score 1), 8 has the smaller total (81 < 107); then 0 and 4 tie at 16 and
    # 4 has the smaller total (41 < 97).  Selected values 1, 2, 4, 7, 8: median 4; the values
    # at distance 0, 2 and (tie between 1 and 7 at 3, lower wins) -> mean(1, 2, 4) = 7/3.
    np.testing.assert_array_equal(bulyan_selection(naive_distances(LINE), 1), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(Bulyan(num_byzantine=1)(LINE), [7 / 3], rtol=1e-6)


def naive_bulyan(rows: np.ndarray, f: int) -> np.ndarray:
    remaining = list(range(len(rows)))
    chosen = []
    for _ in range(len(rows) - 2 * f):
        sub = rows[remaining].astype(np.float64)
        dist = naive_distances(sub)
        k = max(len(remaining) - f - 2, 1)
        scores = [np.sort(np.delete(dist[i], i))[:k].sum() for i in range(len(remaining))]
        # exact ties (the closest pair when k = 1) go to the row nearer to all the others
        best = min(range(len(remaining)), key=lambda i: (scores[i], dist[i].sum()))
        chosen.append(remaining.pop(best))
    selected = rows[chosen].astype(np.float64)
    beta = len(chosen) - 2 * f
    med = np.median(selected, axis=0)
    nearest = np.argsort(np.abs(selected - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(selected, nearest, axis=0).mean(axis=0)


@pytest.mark.usefixtures("many_blocks")
@pytest.mark.parametrize(("n", "f"), [(11, 2), (15, 3), (8, 1)])
def test_bulyan_matches_naive(n: int, f: int) -> None:
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, 50))
    rows[:f] *= 10
    np.testing.assert_allclose(Bulyan(num_byzantine=f)(rows), naive_bulyan(rows, f),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Geometric median
def test_geometric_median_by_hand() -> None:
    # on a line the geometric median is the median
    np.testing.assert_allclose(GeometricMedian()(np.array([[0.0], [1], [2], [10], [50]])),
                               [2.0], atol=1e-4)
    # equilateral triangle: the Fermat point is the centroid
    triangle = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, np.sqrt(3.0)]])
    np.testing.assert_allclose(GeometricMedian()(triangle), [1.0, np.sqrt(3.0) / 3], atol=1e-5)


@pytest.mark.usefixtures("many_blocks")
def test_geometric_median_satisfies_optimality() -> None:
    """Weighted first-order condition: sum_i alpha_i (z - x_i) / ||z - x_i|| = 0."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((9, 6))
    weights = rng.uniform(0.5, 2.0, size=9)
    z = GeometricMedian(tolerance=1e-10, max_iterations=5000)(rows, weights).astype(np.float64)
    gaps = z - rows
    gradient = (weights[:, None] * gaps / np.linalg.norm(gaps, axis=1)[:, None]).sum(axis=0)
    assert np.linalg.norm(gradient) < 1e-4 * weights.sum()


def _identical_cluster(rng: np.random.Generator, *, copies: int) -> tuple[np.ndarray, float]:
    """19 nearly orthogonal rows and ``copies`` copies of a 20th (the mimic attack's rows);
    returns them and ``S = ||sum_{x_i != b} (x_i - b) / ||x_i - b|| ||`` at the copied row b."""
    rows = rng.standard_normal((19 + copies, 400))
    rows[19:] = rows[19]
    others = rows[:19] - rows[19]
    return rows, float(np.linalg.norm((others / np.linalg.norm(others, axis=1)[:, None]).sum(0)))


@pytest.mark.parametrize("iterations", [8, 500])
def test_geometric_median_leaves_identical_rows_that_are_not_the_median(iterations: int) -> None:
    """Six copies of one row: their point b is the median iff S <= 6 (first-order condition at
    a point of mass 6).  Here S > 6, so b is not; the medoid start is b, and the plain smoothed
    step (weight 1 / smoothing on the copies) stayed there, with 8 or 500 iterations."""
    rows, s_value = _identical_cluster(np.random.default_rng(11), copies=6)
    assert s_value == pytest.approx(13.6, abs=0.1)  # > 6
    z = GeometricMedian(max_iterations=iterations)(rows).astype(np.float64)
    objective = lambda p: float(np.linalg.norm(rows - p, axis=1).sum())  # noqa: E731
    assert np.linalg.norm(z - rows[19]) > 0.5 * np.linalg.norm(rows[19])
    assert objective(z) < 0.93 * objective(rows[19])
    best = GeometricMedian(max_iterations=5000, tolerance=1e-12)(rows).astype(np.float64)
    assert objective(z) == pytest.approx(objective(best), rel=1e-3 if iterations == 8 else 1e-6)


def test_geometric_median_stays_at_identical_rows_that_are_the_median() -> None:
    """Five copies of ``-0.1`` times the mean of 20 nearly orthogonal rows (the IPM attack):
    S < 5 there, so that point is the exact median, and the rule returns it."""
    rng = np.random.default_rng(12)
    honest = rng.standard_normal((20, 400))
    rows = np.vstack([honest, np.repeat(-0.1 * honest.mean(0)[None, :], 5, axis=0)])
    units = (honest - rows[20]) / np.linalg.norm(honest - rows[20], axis=1)[:, None]
    assert np.linalg.norm(units.sum(0)) < 5
    np.testing.assert_allclose(GeometricMedian(max_iterations=8)(rows), rows[20], atol=1e-6)


# ---------------------------------------------------------------- Centered clipping
ROWS_1D = np.array([[0.5], [3.0], [-4.0]])


def test_centered_clipping_by_hand() -> None:
    rule = CenteredClipping(tau=1.0, iterations=1)
    # v = 0 + ((0.5) + clip(3) + clip(-4)) / 3 = (0.5 + 1 - 1) / 3
    out, state = rule(ROWS_1D, state=np.zeros(1))
    np.testing.assert_allclose(out, [1 / 6], rtol=1e-6)
    np.testing.assert_array_equal(state, out)
    # second iteration from 1/6: (1/3 + 1 - 1) / 3 = 1/9 more
    out, _ = CenteredClipping(tau=1.0, iterations=2)(ROWS_1D, state=np.zeros(1))
    np.testing.assert_allclose(out, [5 / 18], rtol=1e-6)
    # no state: start at the median 0.5; (0 + 1 - 1) / 3 = 0 move
    np.testing.assert_allclose(rule(ROWS_1D), [0.5], rtol=1e-6)
    out, state = rule(ROWS_1D, state=None)
    np.testing.assert_allclose(out, [0.5], rtol=1e-6)


@pytest.mark.usefixtures("many_blocks")
def test_centered_clipping_matches_naive_and_carries_state() -> None:
    rng = np.random.default_rng(5)
    rule = CenteredClipping(tau=0.7, iterations=3)
    state = None
    for _ in range(3):
        rows = rng.standard_normal((8, 40))
        start = np.median(rows, axis=0) if state is None else state.astype(np.float64)
        v = start.copy()
        for _ in range(3):
            diff = rows - v
            norms = np.linalg.norm(diff, axis=1)
            v = v + (diff * np.minimum(1.0, 0.7 / norms)[:, None]).mean(axis=0)
        out, state = rule(rows, state=state)
        np.testing.assert_allclose(out, v, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- NormBound, NNM, FLTrust
def test_norm_bound_by_hand() -> None:
    # [3, 4] -> [0.6, 0.8] (norm 5 > 1); [0, 1] kept; weights 1 : 3
    out = NormBound(max_norm=1.0)(np.array([[3.0, 4.0], [0.0, 1.0]]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(out, [0.15, 0.95], rtol=1e-6)


def test_nnm_by_hand() -> None:
    # n = 4, f = 1: each row becomes the mean of its 3 nearest (itself included)
    rows = np.array([[0.0], [1.0], [2.0], [10.0]])
    rule = NNM(num_byzantine=1, inner=FedAvg())
    np.testing.assert_allclose(rule.mix(rows)[:, 0], [1, 1, 1, 13 / 3], rtol=1e-6)
    np.testing.assert_allclose(rule(rows), [(3 + 13 / 3) / 4], rtol=1e-6)
    np.testing.assert_allclose(NNM(num_byzantine=1, inner="median")(rows), [1.0], rtol=1e-6)


def test_nnm_passes_state_and_reference_to_the_inner_rule() -> None:
    rows = np.random.default_rng(2).standard_normal((7, 5))
    clipped = NNM(num_byzantine=2, inner={"rule": "centered_clipping", "tau": 0.5})
    assert clipped.stateful and not clipped.linear
    out, state = clipped(rows, state=None)
    np.testing.assert_array_equal(state, out)
    np.testing.assert_allclose(out, CenteredClipping(tau=0.5)(clipped.mix(rows)), rtol=1e-6)
    trusted = NNM(num_byzantine=2, inner="fltrust")
    assert trusted.needs_reference and not NNM(num_byzantine=2, inner="krum").stateful
    reference = rows.mean(axis=0)
    np.testing.assert_allclose(trusted(rows, reference=reference),
                               FLTrust()(trusted.mix(rows), reference=reference), rtol=1e-6)


def test_fltrust_by_hand() -> None:
    # g0 = [1, 0]; cosines 1, 0, -1 (ReLU -> 0), 1/sqrt(2); rescaled to ||g0|| = 1:
    # out = (1 [1, 0] + 0.7071 [0.7071, 0.7071]) / 1.7071 = [1.5, 0.5] / 1.7071
    rows = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    reference = np.array([1.0, 0.0])
    expected = np.array([1.5, 0.5]) / (1 + np.sqrt(0.5))
    np.testing.assert_allclose(FLTrust()(rows, reference=reference), expected, rtol=1e-6)
    # nobody trusted: the model does not move
    np.testing.assert_array_equal(FLTrust()(-rows[[0, 3]], reference=reference), [0.0, 0.0])


def test_bulyan_without_byzantine_rows_is_the_mean() -> None:
    rows = np.random.default_rng(9).standard_normal((5, 7))
    np.testing.assert_allclose(Bulyan(num_byzantine=0)(rows), rows.mean(axis=0), rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 14), d=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_properties_against_reference_implementations(n: int, d: int, seed: int,
                                                      scale: float) -> None:
    rng = np.random.default_rng(seed)
    rows = (scale * rng.standard_normal((n, d))).astype(np.float32)
    np.testing.assert_array_equal(Median()(rows), np.median(rows, axis=0))
    np.testing.assert_allclose(TrimmedMean(beta=0.2)(rows), trim_mean(rows, 0.2, axis=0),
                               rtol=1e-5, atol=1e-6 * scale)
    f = (n - 3) // 2
    expected = naive_krum_scores(rows, f)
    best, runner_up = np.sort(expected)[:2]
    if runner_up - best > 1e-4 * best:  # a clear winner: the float32 Gram must agree
        np.testing.assert_array_equal(Krum(num_byzantine=f)(rows), rows[np.argmin(expected)])
