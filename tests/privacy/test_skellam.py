"""Distributed Skellam: the noise shares, the rotation, the rounding and the closed-form ε."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from securefl.engine.protection import Update
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.privacy.ledger import PrivacyLedger
from securefl.privacy.poisson import poisson, skellam
from securefl.privacy.randomness import SecureRandom
from securefl.privacy.rotation import block_sizes, padded_dimension, rotate, unrotate
from securefl.privacy.skellam import rounded_l2_bound, skellam_rdp

#: Opacus's RDPAccountant.DEFAULT_ALPHAS, written out: the test's own copy
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def counter_entropy(label: bytes):
    """A reproducible stand-in for os.urandom (tests only)."""
    state = {"n": 0}

    def draw(size: int) -> bytes:
        state["n"] += 1
        return hashlib.sha256(label + state["n"].to_bytes(8, "big")).digest()[:size]

    return draw


def fixed_source(label: bytes) -> SecureRandom:
    """The real CSPRNG under reproducible keys (tests only): statistical bounds on its
    output then decide the same way on every run instead of failing once in about 10^4."""
    return SecureRandom(entropy=counter_entropy(label))


def chi_square_p(samples: np.ndarray, pmf) -> float:
    values, counts = np.unique(samples, return_counts=True)
    support = np.arange(values.min() - 1, values.max() + 2)
    expected = pmf(support) * samples.size
    observed = np.zeros(support.size)
    observed[np.searchsorted(support, values)] = counts
    # pool the tails and small cells so that every expected count is >= 5
    cells_o, cells_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            cells_o.append(acc_o)
            cells_e.append(acc_e)
            acc_o = acc_e = 0.0
    cells_o[-1] += acc_o
    cells_e[-1] += acc_e + samples.size - sum(cells_e) - acc_e
    statistic = sum((o - e) ** 2 / e for o, e in zip(cells_o, cells_e, strict=True))
    return float(stats.chi2.sf(statistic, len(cells_o) - 1))


@pytest.mark.parametrize(("variance", "shares"), [(40.0, 8), (800.0, 16)])
def test_the_sum_of_n_shares_is_exactly_skellam(variance, shares):
    """Inversion (lam = 2.5) and PTRS (lam = 25) shares: the sum of n draws of Sk(mu / n)
    fits Sk(mu), and each share fits Sk(mu / n) (chi-square on 20 000 sums)."""
    source = fixed_source(b"shares")
    count = 20_000
    draws = np.stack([skellam(variance / shares, count, source=source) for _ in range(shares)])
    total = draws.sum(axis=0)
    exact = stats.skellam(variance / 2, variance / 2)
    assert chi_square_p(total, exact.pmf) > 1e-3
    share = stats.skellam(variance / shares / 2, variance / shares / 2)
    assert chi_square_p(draws[0], share.pmf) > 1e-3
    assert abs(total.var() / variance - 1) < 0.05
    assert abs(total.mean()) < 4 * math.sqrt(variance / count)  # four standard errors


def test_the_poisson_sampler_draws_from_the_csprng_only():
    calls = []

    def entropy(size: int) -> bytes:
        calls.append(size)
        return os.urandom(size)

    draws = poisson(1e4, 50_000, source=SecureRandom(entropy=entropy))
    assert calls and all(size == 32 for size in calls)  # one fresh AES-256 key per request
    assert abs(draws.mean() - 1e4) < 3 and abs(draws.var() / 1e4 - 1) < 0.05


def renyi(alpha: int, variance: float, shift: int) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)) summed numerically over the support."""
    reach = int(15 * math.sqrt(variance)) + 20  # the mass beyond is far below 1e-30
    k = np.arange(-reach, reach + shift + 1)
    law = stats.skellam(variance / 2, variance / 2)
    log_p, log_q = law.logpmf(k - shift), law.logpmf(k)
    terms = alpha * log_p + (1 - alpha) * log_q
    return float(logsumexp(terms[np.isfinite(terms)]) / (alpha - 1))


@pytest.mark.parametrize("variance", [4.0, 50.0, 400.0])
def test_the_rdp_theorem_bounds_the_exact_renyi_divergence(variance):
    for alpha in (2, 3, 5, 8):
        exact = renyi(alpha, variance, shift=2)
        bound = float(skellam_rdp([alpha], variance=variance, l1=2.0, l2=2.0)[0])
        assert exact <= bound * (1 + 1e-9)
        gaussian = alpha * 4 / (2 * variance)
        assert bound <= gaussian * (1 + 3 / variance)  # the discreteness term vanishes


def independent_epsilon(rounds: int, *, variance: float, l1: float, l2: float,
                        delta: float) -> float:
    """Agarwal et al. 2021, Theorem 3.5, at ceil(alpha), and the RDP conversion of Balle et
    al. 2020 (Opacus's), written here from the papers."""
    best = math.inf
    for alpha in ALPHAS:
        a = math.ceil(alpha)
        rdp = rounds * (a * l2 ** 2 / (2 * variance)
                        + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                              3 * l1 / (2 * variance)))
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log(
            (alpha - 1) / alpha)
        best = min(best, eps)
    return best


def test_the_ledger_records_the_closed_form_epsilon(tmp_path):
    settings = DistributedSettings(target_epsilon=4.0, delta=1e-5, steps=3, clip_norm=0.5,
                                   bits=16, expected_cohort=10, min_cohort=8)
    plan = settings.plan(700)
    event = plan.event()
    assert event.variance == pytest.approx(plan.variance, rel=1e-12)
    assert plan.l2 == pytest.approx(rounded_l2_bound(plan.scale * 0.5, dimension=768))
    assert plan.padded == 768 and plan.l1 == pytest.approx(min(plan.l2 ** 2,
                                                               math.sqrt(768) * plan.l2))
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite", delta=1e-5, budgets=4.0)
    for round in (1, 2, 3):
        ledger.charge("site", event, round=round)
    for rounds, (_, recorded) in enumerate(ledger.history("site"), start=1):
        expected = independent_epsilon(rounds, variance=plan.variance, l1=plan.l1,
                                       l2=plan.l2, delta=1e-5)
        assert recorded == pytest.approx(expected, rel=1e-9)
    # calibrated: three rounds spend the target, within the bisection's tolerance
    assert 3.99 < ledger.epsilon("site") <= 4.0
    reopened = PrivacyLedger(tmp_path / "ledger.sqlite", delta=1e-5, budgets=4.0)
    assert reopened.events("site") == [event] * 3


@pytest.mark.parametrize("dimension", [1, 255, 256, 4810, 70_001])
def test_the_rotation_is_invertible_and_norm_preserving(dimension):
    rng = np.random.default_rng(dimension)
    vector = rng.normal(size=dimension)
    seed = os.urandom(32)
    rotated = rotate(vector, seed=seed)
    assert rotated.shape == (padded_dimension(dimension),)
    assert sum(block_sizes(dimension)) == rotated.size < dimension + 256
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(vector), rel=1e-12)
    np.testing.assert_allclose(unrotate(rotated, seed=seed, dimension=dimension), vector,
                               atol=1e-12)
    if dimension > 1:  # one coordinate is rotated to +-H[:, 0] / 16: one sign in two
        assert not np.allclose(rotate(vector, seed=os.urandom(32)), rotated)


def test_the_rotation_is_the_signed_walsh_hadamard_transform():
    from scipy.linalg import hadamard

    seed = bytes(range(32))
    basis = np.eye(256)
    matrix = np.stack([rotate(e, seed=seed) for e in basis], axis=1)
    signs = np.diag(matrix.T @ (hadamard(256) / 16))  # R = H D / sqrt(B)
    assert set(np.round(signs, 12)) == {-1.0, 1.0}
    np.testing.assert_allclose(matrix, hadamard(256) / 16 * signs, atol=1e-12)


def test_conditional_rounding_meets_its_bound_and_is_unbiased():
    settings = DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0,
                                   bits=16, expected_cohort=20, min_cohort=16)
    plan = settings.plan(1000)
    encoding = SkellamEncoding(settings, source=fixed_source(b"r"))
    rng = np.random.default_rng(0)
    vector = rotate(rng.normal(size=1000) / math.sqrt(1000), seed=bytes(32)) * plan.scale
    draws = np.stack([encoding.round_to_integers(vector, plan.l2) for _ in range(200)])
    assert (np.linalg.norm(draws, axis=1) <= plan.l2).all()
    assert (np.abs(draws - vector) < 1).all()
    assert np.abs(draws.mean(axis=0) - vector).max() < 0.25  # 200 Bernoullis per coordinate


def test_a_site_encodes_its_clipped_rotated_rounded_noisy_update_at_the_width():
    settings = DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0,
                                   bits=12, expected_cohort=20, min_cohort=16)
    encoding = SkellamEncoding(settings)
    words, seeds = encoding.encode(Update(np.full(300, 10.0, np.float32), 1.0), seed=bytes(32))
    assert seeds == ()  # no noise levels: nothing removable
    assert words.dtype == np.dtype("<u2") and words.shape == (512,)
    assert int(words.max()) < 1 << 12
    assert encoding.check_cohort(15) is not None and encoding.check_cohort(16) is None
