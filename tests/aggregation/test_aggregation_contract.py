"""The contract every aggregation rule meets (one parametrized suite).

Each case builds a rule for ``f = 2`` byzantine rows and knows the smallest ``n`` its
precondition admits.  Blocks are shrunk so the multi-block (float32, centred) distance path and
the blocked sort run even on these small inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

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

F = 2
N = 11
D = 17


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any]
    min_rows: int
    robust: bool = True
    reference: bool = False  # FLTrust: called with the server's update
    uses_weights: bool = False

    def __call__(self, rows: np.ndarray, weights: np.ndarray | None = None,
                 reference: np.ndarray | None = None) -> np.ndarray:
        rule = self.build()
        if self.reference:
            return rule(rows, weights, reference=reference)
        return rule(rows, weights)


CASES = [
    Case("fedavg", FedAvg, 1, robust=False, uses_weights=True),
    Case("krum", lambda: Krum(num_byzantine=F), 2 * F + 3),
    Case("multikrum", lambda: MultiKrum(num_byzantine=F), 2 * F + 3),
    Case("multikrum_m3", lambda: MultiKrum(num_byzantine=F, num_selected=3), 2 * F + 3),
    Case("median", Median, 1),
    Case("trimmed_mean", lambda: TrimmedMean(beta=0.2), 5),
    Case("bulyan", lambda: Bulyan(num_byzantine=F), 4 * F + 3),
    Case("geometric_median", GeometricMedian, 1, uses_weights=True),
    Case("centered_clipping", lambda: CenteredClipping(tau=0.5, iterations=3), 1),
    Case("norm_bound", lambda: NormBound(max_norm=10.0), 1, uses_weights=True),
    Case("nnm_krum", lambda: NNM(num_byzantine=F, inner=Krum(num_byzantine=F)), 2 * F + 3),
    Case("nnm_trimmed_mean", lambda: NNM(num_byzantine=F, inner=TrimmedMean(beta=0.2)), 5),
    Case("fltrust", FLTrust, 1, reference=True),
]
ROBUST = [case for case in CASES if case.robust]


@pytest.fixture(autouse=True, params=["one_block", "many_blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "many_blocks":
        monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 40)
        monkeypatch.setattr(median, "SORT_BLOCK_ELEMENTS", 40)


def honest_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    centre = rng.normal(0.3, 0.2, size=D)
    return (centre + 0.1 * rng.standard_normal((count, D))).astype(np.float32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_rows_give_that_row(case: Case, seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = honest_rows(rng, 1)[0]
    rows = np.tile(row, (N, 1))
    weights = rng.uniform(0.5, 3.0, size=N)
    out = case(rows, weights, reference=row)
    assert out.dtype == np.float32 and out.shape == (D,)
    np.testing.assert_allclose(out, row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_invariant(case: Case, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = honest_rows(rng, N)
    rows[:F] += rng.normal(0, 3.0, size=(F, D)).astype(np.float32)
    weights = rng.uniform(0.5, 3.0, size=N)
    reference = rows[F:].mean(axis=0)
    order = rng.permutation(N)
    out = case(rows, weights, reference=reference)
    shuffled = case(rows[order], weights[order], reference=reference)
    np.testing.assert_allclose(shuffled, out, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, 0)


def byzantine_rows(rng: np.random.Generator, honest: np.ndarray, pattern: str) -> np.ndarray:
    if pattern == "huge_random":
        return (1e6 * rng.standard_normal((F, D))).astype(np.float32)
    if pattern == "huge_identical":
        return np.tile(1e6 * rng.standard_normal(D), (F, 1)).astype(np.float32)
    if pattern == "sign_flip_scaled":
        return np.tile(-1e6 * honest.mean(axis=0), (F, 1)).astype(np.float32)
    if pattern == "overflowing":  # finite, but its squares overflow float32
        return np.full((F, D), 3e37, dtype=np.float32)
    raise AssertionError(pattern)


PATTERNS = ["huge_random", "huge_identical", "sign_flip_scaled", "overflowing"]


@pytest.mark.parametrize("case", ROBUST, ids=lambda c: c.name)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bounded_with_f_arbitrary_rows(case: Case, pattern: str) -> None:
    rng = np.random.default_rng(7)
    honest = honest_rows(rng, N - F)
    rows = np.vstack([byzantine_rows(rng, honest, pattern), honest])
    weights = rng.uniform(0.5, 3.0, size=N)
    out = case(rows, weights, reference=honest.mean(axis=0))
    spread = np.linalg.norm(honest, axis=1).max()
    assert np.isfinite(out).all()
    assert np.linalg.norm(out) <= 5 * spread


@pytest.mark.parametrize("case", [c for c in CASES if not c.uses_weights], ids=lambda c: c.name)
def test_claimed_weights_are_ignored(case: Case) -> None:
    """Rules that ignore weights give byzantine clients nothing for claiming many examples."""
    rng = np.random.default_rng(8)
    rows = honest_rows(rng, N)
    forged = np.ones(N)
    forged[:F] = 1e6
    reference = rows.mean(axis=0)
    np.testing.assert_array_equal(case(rows, forged, reference=reference),
                                  case(rows, None, reference=reference))


def test_geometric_median_breaks_down_by_weight() -> None:
    """RFA is weighted: its breakdown point is half the total weight, not half the rows."""
    rng = np.random.default_rng(7)
    honest = honest_rows(rng, N - F)
    rows = np.vstack([byzantine_rows(rng, honest, "huge_identical"), honest])
    weights = np.ones(N)
    assert np.linalg.norm(GeometricMedian()(rows, weights)) < 5
    weights[:F] = N  # the two byzantine rows now hold more than half the weight
    np.testing.assert_allclose(GeometricMedian()(rows, weights), rows[0], rtol=1e-4)


def test_fedavg_is_not_bounded() -> None:
    """The mean has breakdown point 0: one 1e6-scaled row moves it by ~1e6 / n."""
    rng = np.random.default_rng(7)
    honest = honest_rows(rng, N - F)
    rows = np.vstack([byzantine_rows(rng, honest, "huge_identical"), honest])
    assert np.linalg.norm(FedAvg()(rows)) > 1e4 * np.linalg.norm(honest, axis=1).max()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_too_few_rows_raise(case: Case) -> None:
    rng = np.random.default_rng(3)
    reference = np.ones(D, dtype=np.float32)
    case(honest_rows(rng, case.min_rows), reference=reference)  # the bound itself is allowed
    with pytest.raises(ValueError, match=r"need|got"):
        case(honest_rows(rng, case.min_rows - 1)[: case.min_rows - 1], reference=reference)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_shapes_and_weights_raise(case: Case) -> None:
    rng = np.random.default_rng(4)
    rows = honest_rows(rng, N)
    reference = rows.mean(axis=0)
    with pytest.raises(ValueError, match="shape"):
        case(rows[0], reference=reference)
    with pytest.raises(ValueError, match="weights"):
        case(rows, np.ones(N - 1), reference=reference)
    with pytest.raises(ValueError, match="weights"):
        case(rows, -np.ones(N), reference=reference)


@pytest.mark.parametrize("case", ROBUST, ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_raise(case: Case, bad: float) -> None:
    rng = np.random.default_rng(5)
    rows = honest_rows(rng, N)
    rows[3, 5] = bad
    with pytest.raises(ValueError, match="finite"):
        case(rows, reference=rows[4])


BAD_OPTIONS: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
    (Krum, {"num_byzantine": -1}, ">= 0"),
    (Krum, {"num_byzantine": 1.5}, "int"),
    (MultiKrum, {"num_byzantine": 1, "num_selected": 0}, ">= 1"),
    (TrimmedMean, {"beta": 0.5}, r"\[0, 0.5\)"),
    (TrimmedMean, {"beta": -0.1}, r"\[0, 0.5\)"),
    (Bulyan, {"num_byzantine": -2}, ">= 0"),
    (GeometricMedian, {"smoothing": 0.0}, "smoothing"),
    (GeometricMedian, {"max_iterations": 0}, "max_iterations"),
    (CenteredClipping, {"tau": 0.0}, "tau"),
    (CenteredClipping, {"iterations": 0}, "iterations"),
    (NormBound, {"max_norm": -1.0}, "max_norm"),
    (NormBound, {"max_norm": float("inf")}, "max_norm"),
    (NNM, {"num_byzantine": -1, "inner": "median"}, ">= 0"),
    (NNM, {"num_byzantine": 1, "inner": "nnm"}, "other than 'nnm'"),
    (FLTrust, {"root_examples": 0}, "root_examples"),
]


@pytest.mark.parametrize(("rule", "options", "message"), BAD_OPTIONS)
def test_bad_options_raise(rule: Callable[..., Any], options: dict[str, Any],
                           message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        rule(**options)


def test_call_time_bounds_name_the_bound() -> None:
    rows = honest_rows(np.random.default_rng(6), 9)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2 = 8"):
        Krum(num_byzantine=3)(rows[:8])
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3 = 11"):
        Bulyan(num_byzantine=2)(rows)
    with pytest.raises(ValueError, match=r"num_selected=8 must be <= n - f = 7"):
        MultiKrum(num_byzantine=2, num_selected=8)(rows)
    with pytest.raises(ValueError, match=r"trims floor\(beta \* n\) = 0 values at n = 9; "
                                         r"need n >= 10"):
        TrimmedMean(beta=0.1)(rows)
    with pytest.raises(ValueError, match=r"n > 2f = 8"):
        NNM(num_byzantine=4, inner="median")(rows[:8])
    with pytest.raises(ValueError, match="reference"):
        FLTrust()(rows)
    with pytest.raises(ValueError, match="non-zero"):
        FLTrust()(rows, reference=np.zeros(D))
