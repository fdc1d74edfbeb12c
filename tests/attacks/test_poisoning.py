"""Update attacks: one contract suite for every attack, then each formula checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.aggregation import FedAvg, Median
from securefl.attacks.optimized import (
    AGRTailored,
    FangKrum,
    MinMax,
    MinSum,
    krum_index,
    perturbation,
)
from securefl.attacks.poisoning import ALIE, IPM, GaussianNoise, Scaling, SignFlip, alie_z
from securefl.attacks.registry import ATTACKS, build_attack


def honest_rows(h: int = 8, d: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.5, 0.2, size=(h, d))).astype(np.float32)


def run(name: str, rows: np.ndarray, f: int, seed: int, **context: int) -> np.ndarray:
    """Call attack ``name``; the adaptive one gets the server's rule (a median here)."""
    attack = build_attack(name, context=context)
    aggregator = Median() if name == "agr_tailored" else None
    return attack(rows, num_byzantine=f, rng=np.random.default_rng(seed), aggregator=aggregator)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("f", [1, 2, 3])
def test_contract_shape_dtype_finite(name: str, f: int) -> None:
    out = run(name, honest_rows(), f, 1, num_clients=11)
    assert out.shape == (f, 20)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_deterministic_for_a_seed(name: str) -> None:
    rows = honest_rows()
    np.testing.assert_array_equal(run(name, rows, 2, 7), run(name, rows, 2, 7))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_does_not_modify_input(name: str) -> None:
    rows = honest_rows()
    before = rows.copy()
    run(name, rows, 2, 0)
    np.testing.assert_array_equal(rows, before)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_rejects_bad_inputs(name: str) -> None:
    with pytest.raises(ValueError, match="shape"):
        run(name, np.zeros(5), 1, 0)
    with pytest.raises(ValueError, match="num_byzantine"):
        run(name, honest_rows(), -1, 0)
    bad = honest_rows()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        run(name, bad, 1, 0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_declares_its_view(name: str) -> None:
    assert isinstance(build_attack(name).omniscient, bool)


def test_registry_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        build_attack("nope")
    with pytest.raises(TypeError):
        build_attack("ipm", sigma=3)


def test_registry_context_only_reaches_attacks_that_take_it() -> None:
    alie = build_attack("alie", context={"num_clients": 20, "server_lr": 2.0})
    assert alie.num_clients == 20
    scaling = build_attack("scaling", context={"num_clients": 20, "server_lr": 2.0})
    assert scaling.factor(99) == 10.0
    # an explicit option wins over the context
    assert build_attack("alie", context={"num_clients": 20}, num_clients=30).num_clients == 30


# ----------------------------------------------------------------------------- formulas
def test_sign_flip_negates_the_visible_rows_cyclically() -> None:
    rows = honest_rows(h=2)
    out = SignFlip(scale=4.0)(rows, num_byzantine=3, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out, -4.0 * rows[[0, 1, 0]], rtol=1e-6)


def test_gaussian_noise_moments() -> None:
    out = GaussianNoise(std=3.0, mean=1.0)(honest_rows(d=4000), num_byzantine=5,
                                            rng=np.random.default_rng(0))
    assert abs(out.mean() - 1.0) < 0.05
    assert abs(out.std() - 3.0) < 0.05
    centred = GaussianNoise(std=1e-6, around_honest=True)(
        honest_rows(), num_byzantine=1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(centred[0], honest_rows().mean(axis=0), atol=1e-4)


def test_scaling_gamma_is_participants_over_server_lr() -> None:
    rows = honest_rows(h=2)
    out = Scaling(num_clients=10, server_lr=0.5)(rows, num_byzantine=2,
                                                  rng=np.random.default_rng(0))
    # gamma = n / eta = 20, split over the f = 2 colluding rows
    np.testing.assert_allclose(out, np.tile(10.0 * rows.mean(axis=0), (2, 1)), rtol=1e-5)
    assert Scaling().factor(7) == 7.0
    assert Scaling(gamma=3.0, num_clients=10).factor(7) == 3.0


@pytest.mark.parametrize("f", [1, 3])
def test_scaling_replaces_the_fedavg_model(f: int) -> None:
    """Bagdasaryan et al. eq. 3: with the other updates cancelling, G + eta * mean = X."""
    honest = np.zeros((10 - f, 4), np.float32)
    target = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    evil = Scaling(num_clients=10, server_lr=0.5)(np.tile(target, (f, 1)), num_byzantine=f,
                                                  rng=np.random.default_rng(0))
    np.testing.assert_allclose(0.5 * FedAvg()(np.vstack([honest, evil])), target, rtol=1e-6)


@pytest.mark.parametrize(("n", "f", "z"), [
    (50, 24, 1.7507),   # s = 2:  Phi^-1(48/50)
    (20, 4, 0.3853),    # s = 7:  Phi^-1(13/20)
    (10, 2, 0.2533),    # s = 4:  Phi^-1(6/10)
    (25, 5, 0.4677),    # s = 8:  Phi^-1(17/25)
])
def test_alie_z_matches_the_paper_formula(n: int, f: int, z: float) -> None:
    assert alie_z(n, f) == pytest.approx(z, abs=1e-4)


def test_alie_z_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="f < n"):
        alie_z(4, 4)
    with pytest.raises(ValueError, match="byzantine minority"):
        alie_z(10, 6)  # s = 0: the attackers are a majority on their own


def test_alie_rows_are_mean_plus_z_std() -> None:
    rows = honest_rows(h=6).astype(np.float64)
    out = ALIE(num_clients=20)(rows, num_byzantine=4, rng=np.random.default_rng(0))
    expected = rows.mean(0) + alie_z(20, 4) * rows.std(0, ddof=1)
    np.testing.assert_allclose(out, np.tile(expected, (4, 1)), rtol=1e-5)
    explicit = ALIE(z=1.5)(rows, num_byzantine=1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(explicit[0], rows.mean(0) + 1.5 * rows.std(0, ddof=1), rtol=1e-5)
    # without num_clients, n = h + f
    assert ALIE().z_for(4, 16) == pytest.approx(alie_z(20, 4))


def test_ipm_is_minus_eps_times_the_mean() -> None:
    rows = honest_rows()
    out = IPM(eps=0.5)(rows, num_byzantine=2, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out, np.tile(-0.5 * rows.mean(0), (2, 1)), rtol=1e-5)
    # exactly the float64 mean of a float64 copy, which the attack no longer makes
    exact = (-0.5 * rows.astype(np.float64).mean(axis=0)).astype(np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, np.tile(exact, (2, 1)))
    # FedAvg inner product with mu: (1 - p - p eps)|mu|^2
    mu = rows.mean(0).astype(np.float64)
    aggregate = FedAvg()(np.vstack([rows, out]))
    p = 2 / 10
    assert float(aggregate @ mu) == pytest.approx((1 - p - p * 0.5) * float(mu @ mu), rel=1e-4)


def test_perturbations() -> None:
    rows = honest_rows().astype(np.float64)
    mu = rows.mean(0)
    np.testing.assert_allclose(perturbation(rows, "unit_vec"), -mu / np.linalg.norm(mu))
    np.testing.assert_allclose(perturbation(rows, "std"), -rows.std(0, ddof=1))
    np.testing.assert_array_equal(perturbation(rows, "sign"), -np.sign(mu))
    with pytest.raises(ValueError, match="perturbation"):
        MinMax(perturbation="bogus")  # type: ignore[arg-type]


def _min_max_gamma(rows: np.ndarray, direction: np.ndarray) -> float:
    """Closed-form largest gamma with max_i |mu + gamma p - g_i| <= max_ij |g_i - g_j|."""
    mu = rows.mean(0)
    bound = max(np.linalg.norm(a - b) for a in rows for b in rows) ** 2
    best = math.inf
    for g in rows:
        # |mu - g + gamma p|^2 = bound  ->  quadratic in gamma; take its positive root
        a, b, c = direction @ direction, 2 * (mu - g) @ direction, (mu - g) @ (mu - g) - bound
        best = min(best, (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    return best


@pytest.mark.parametrize("kind", ["std", "unit_vec", "sign"])
def test_min_max_finds_the_largest_admissible_gamma(kind: str) -> None:
    rows = honest_rows().astype(np.float64)
    attack = MinMax(perturbation=kind)  # type: ignore[arg-type]
    out = attack(rows, num_byzantine=3, rng=np.random.default_rng(0)).astype(np.float64)
    expected = _min_max_gamma(rows, perturbation(rows, kind))
    assert attack.last_gamma == pytest.approx(expected, abs=1e-4)
    # the constraint holds (up to float32 rounding of the output)
    bound = max(np.linalg.norm(a - b) for a in rows for b in rows)
    assert max(np.linalg.norm(out[0] - g) for g in rows) <= bound + 1e-5


def test_min_sum_finds_the_largest_admissible_gamma() -> None:
    rows = honest_rows().astype(np.float64)
    attack = MinSum()
    out = attack(rows, num_byzantine=2, rng=np.random.default_rng(0)).astype(np.float64)
    mu, p = rows.mean(0), perturbation(rows, "std")
    bound = max(sum(np.sum((a - b) ** 2) for b in rows) for a in rows)
    # sum_i |mu - g_i + gamma p|^2 = S0 + h gamma^2 |p|^2 (the cross term vanishes at the mean)
    s0 = sum(np.sum((mu - g) ** 2) for g in rows)
    expected = math.sqrt((bound - s0) / (len(rows) * (p @ p)))
    assert attack.last_gamma == pytest.approx(expected, abs=1e-4)
    assert sum(np.sum((out[0] - g) ** 2) for g in rows) <= bound * (1 + 1e-5)


def test_gamma_search_gives_zero_when_nothing_is_admissible() -> None:
    rows = np.ones((4, 3), np.float32)  # no spread: only gamma = 0 keeps the bound
    attack = MinMax(perturbation="unit_vec")
    attack(rows, num_byzantine=1, rng=np.random.default_rng(0))
    assert attack.last_gamma == 0.0


def test_agr_tailored_needs_the_rule_and_pushes_the_mean_as_far_as_it_searches() -> None:
    rows = honest_rows()
    with pytest.raises(ValueError, match="needs the server's rule"):
        AGRTailored()(rows, num_byzantine=2, rng=np.random.default_rng(0))
    # FedAvg moves linearly with gamma, so every trial succeeds and the search climbs to
    # gamma_init * (1 + 1/2 + 1/4 + ...) = 2 gamma_init
    attack = AGRTailored(gamma_init=3.0)
    out = attack(rows, num_byzantine=2, rng=np.random.default_rng(0), aggregator=FedAvg())
    assert attack.last_gamma == pytest.approx(6.0, abs=1e-4)
    np.testing.assert_allclose(out[0], rows.mean(0) + 6.0 * perturbation(
        rows.astype(np.float64), "std"), rtol=1e-3, atol=1e-4)


def test_agr_tailored_reaches_the_largest_median_shift() -> None:
    rows = np.random.default_rng(3).normal(0.2, 1.0, size=(8, 40)).astype(np.float32)
    mu, direction = rows.mean(0), perturbation(rows.astype(np.float64), "std")

    def shift(crafted: np.ndarray) -> float:
        stacked = np.vstack([np.tile(crafted, (3, 1)), rows]).astype(np.float32)
        return float(np.linalg.norm(Median()(stacked) - mu))

    best = max(shift(mu + g * direction) for g in np.linspace(0, 20, 81))
    out = AGRTailored()(rows, num_byzantine=3, rng=np.random.default_rng(0),
                        aggregator=Median())
    assert shift(out[0]) == pytest.approx(best, rel=1e-4)
    assert shift(out[0]) > 100 * shift(mu)  # versus sending the honest mean


def test_krum_index_counts_n_minus_f_minus_2_neighbours() -> None:
    # n = 6, f = 1 -> 3 neighbours.  Row 5 sits 1 away from rows 0-2 (score 3); rows 0-2
    # are 0 apart from each other but 1 from row 5 and 100 from row 4 -> score 0+0+1 = 1.
    rows = np.zeros((6, 1))
    rows[3], rows[4], rows[5] = 50.0, 10.0, 1.0
    assert krum_index(rows, 1) == 0
    with pytest.raises(ValueError, match="n > f \\+ 2"):
        krum_index(rows[:3], 1)


def test_fang_lambda_bound_matches_the_paper() -> None:
    rows = honest_rows(h=7, d=5).astype(np.float64)
    m, c, d = 10, 3, 5
    dist = np.array([[np.linalg.norm(a - b) for b in rows] for a in rows])
    np.fill_diagonal(dist, np.inf)
    spread = min(np.sort(row)[: m - c - 2].sum() for row in dist)
    expected = spread / ((m - 2 * c - 1) * math.sqrt(d)) + max(
        np.linalg.norm(r) for r in rows) / math.sqrt(d)
    assert FangKrum().lambda_max(rows, c, m) == pytest.approx(expected)
    with pytest.raises(ValueError, match="m > 2c \\+ 1"):
        FangKrum().lambda_max(rows, 5, 10)


def test_fang_falls_back_to_the_threshold_when_krum_cannot_be_fooled() -> None:
    rows = honest_rows(h=8, d=30)  # mean 0.5 >> spread 0.2: -lambda s is always an outlier
    attack = FangKrum()
    out = attack(rows, num_byzantine=3, rng=np.random.default_rng(0))
    assert attack.last_lambda == attack.threshold
    assert krum_index(np.vstack([out, rows]), 3) >= 3


def test_fang_makes_krum_select_a_crafted_row_against_the_mean_direction() -> None:
    # noisy updates (spread >> mean), the regime of stochastic gradients the paper targets
    rows = np.random.default_rng(0).normal(0.1, 1.0, size=(8, 30)).astype(np.float32)
    attack = FangKrum()
    out = attack(rows, num_byzantine=3, rng=np.random.default_rng(0))
    stacked = np.vstack([out, rows])
    assert krum_index(stacked, 3) < 3
    # lambda_max = 3.18 here; the search halves twice before Krum picks the crafted row
    assert attack.last_lambda == pytest.approx(attack.lambda_max(rows.astype(float), 3, 11) / 4)
    np.testing.assert_allclose(out[0], -attack.last_lambda * np.sign(rows.mean(0)), rtol=1e-6)


def test_fang_radius_spreads_the_other_rows_within_the_ball() -> None:
    out = FangKrum(radius=0.01)(honest_rows(), num_byzantine=4, rng=np.random.default_rng(0))
    spread = np.linalg.norm(out[1:] - out[0], axis=1)
    assert (spread <= 0.01 + 1e-6).all() and (spread > 0).all()


def test_fang_adaptive_uses_the_given_aggregator() -> None:
    rows = honest_rows(h=8, d=30)

    class Picky:
        linear = False

        def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            return updates[-1]  # never one of the crafted rows (they come first)

    attack = FangKrum(threshold=1e-3)
    attack(rows, num_byzantine=2, rng=np.random.default_rng(0), aggregator=Picky())
    assert attack.last_lambda == 1e-3


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 8), f=st.integers(0, 4), d=st.integers(1, 12), seed=st.integers(0, 99))
def test_attacks_are_finite_and_well_shaped_on_random_inputs(h: int, f: int, d: int,
                                                             seed: int) -> None:
    rows = np.random.default_rng(seed).normal(size=(h, d)).astype(np.float32)
    for name in ("sign_flip", "gaussian", "alie", "ipm", "min_max", "min_sum", "agr_tailored"):
        if name == "alie" and f >= (h + f) // 2 + 1:
            with pytest.raises(ValueError, match="minority"):
                run(name, rows, f, seed)
            continue
        out = run(name, rows, f, seed)
        assert out.shape == (f, d)
        assert np.isfinite(out).all()
