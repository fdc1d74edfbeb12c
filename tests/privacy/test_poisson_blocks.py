"""The blocked PTRS sampler: exactly Hoermann's rule, candidate by candidate, on the one
keystream of a request, block after block (boundaries included), and still Poisson."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import gammaln

from securefl.privacy import poisson as sampler
from securefl.privacy.poisson import poisson, skellam
from securefl.privacy.randomness import SecureRandom
from tests.privacy.test_skellam import chi_square_p


def fixed(key: int) -> SecureRandom:
    return SecureRandom(entropy=lambda size: bytes([key]) * size)


def reference(lam: float, count: int, words: np.ndarray, block: int) -> list[int]:
    """PTRS (Hoermann 1993) in plain Python floats, one candidate at a time: block ``i``'s
    words ``[2 B i, 2 B i + B)`` give ``U = j 2^-53 - 1/2`` and the next ``B`` give ``V``."""
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    log_alpha, v_r = math.log(1.1239 + 1.1328 / (b - 3.4)), 0.9277 - 3.6224 / (b - 2)
    out: list[int] = []
    for start in range(0, words.size, 2 * block):
        for j in range(block):
            big_u = int(words[start + j] >> np.uint64(11)) * 2.0 ** -53 - 0.5
            v = int(words[start + block + j] >> np.uint64(11)) * 2.0 ** -53
            u_s = 0.5 - abs(big_u)
            if u_s == 0:
                continue  # k = -inf: rejected
            k = math.floor((2 * a / u_s + b) * big_u + lam + 0.43)
            if not (u_s >= 0.07 and v <= v_r):
                if k < 0 or (u_s < 0.013 and v > u_s):
                    continue
                log_v = math.log(v) if v > 0 else -math.inf
                if (log_v + log_alpha - math.log(a / (u_s * u_s) + b)
                        > -lam + k * math.log(lam) - math.lgamma(k + 1)):
                    continue
            out.append(k)
            if len(out) == count:
                return out
    raise AssertionError("the reference ran out of words")


@pytest.mark.parametrize("lam", [12.0, 331.5, 124_547.6])
def test_the_blocks_follow_the_rule_candidate_by_candidate(lam, monkeypatch):
    """Small blocks (many boundaries, and a surplus dropped at the end): the sampler's
    draws are exactly the reference's on the same keystream."""
    monkeypatch.setattr(sampler, "_BLOCK", 256)
    count = 3000
    draws = poisson(lam, count, source=fixed(7))
    words = fixed(7).words(2 * 256 * 40)  # the same key's stream, further than needed
    assert draws.tolist() == reference(lam, count, words, 256)


def test_a_request_larger_than_a_block_crosses_the_boundary_exactly():
    count = sampler._BLOCK  # about 1.1 candidates per draw: a second block is needed
    block = sampler._block_size(count)
    assert block == sampler._BLOCK
    draws = poisson(5_000.0, count, source=fixed(3))
    words = fixed(3).words(4 * block)
    assert draws.tolist() == reference(5_000.0, count, words, block)


def test_noise_added_into_a_vector_is_the_noise_alone_plus_the_vector():
    base = np.arange(-500, 500, dtype=np.int64)
    alone = skellam(300.0, 1000, source=fixed(9))
    added = skellam(300.0, 1000, source=fixed(9), add_to=base.copy())
    np.testing.assert_array_equal(added, base + alone)
    with pytest.raises(ValueError, match="add_to"):
        skellam(300.0, 1000, source=fixed(9), add_to=np.zeros(999, np.int64))


def test_small_blocks_still_draw_poisson_and_skellam(monkeypatch):
    monkeypatch.setattr(sampler, "_BLOCK", 256)
    draws = poisson(40.0, 20_000, source=fixed(11))  # fixed keys: a reproducible test
    assert chi_square_p(draws, stats.poisson(40.0).pmf) > 1e-3
    shares = skellam(90.0, 20_000, source=fixed(12))
    assert chi_square_p(shares, stats.skellam(45.0, 45.0).pmf) > 1e-3


def test_log_factorials_come_from_the_table_or_gammaln_bit_for_bit():
    """Inside the table, and 300 candidates outside it (five fallback chunks): the values
    the exact test reads are gammaln's, and so are its decisions."""
    lam = 124_547.6
    ptrs = sampler._Ptrs(lam, 1 << 15)
    assert ptrs.table is not None and ptrs.table.size < 5000
    rng = np.random.default_rng(1)
    near = np.floor(rng.normal(lam, 700, 4000))
    far = np.floor(np.concatenate([rng.uniform(0, ptrs.low, 150),
                                   rng.uniform(ptrs.low + ptrs.table.size, 1e7, 150)]))
    k = np.concatenate([near, far, [-np.inf, -3.0]])
    u_s = np.concatenate([rng.uniform(0.013, 0.5, near.size), rng.uniform(1e-6, 0.013, 302)])
    v = np.concatenate([rng.uniform(0, 1, near.size), u_s[near.size:] / 2])  # V <= u_s: tested
    needed = k >= 0
    values = ptrs._log_factorial(k.copy(), needed)
    np.testing.assert_array_equal(values[needed], gammaln(k[needed] + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rule = ((k >= 0) & (u_s > 0) & ~((u_s < 0.013) & (v > u_s))
                & (np.log(v) + ptrs.log_alpha - np.log(ptrs.a / (u_s * u_s) + ptrs.b)
                   <= -lam + k * ptrs.log_lam - gammaln(np.maximum(k, 0) + 1)))
    decided = ptrs.exact(k, u_s, v)
    np.testing.assert_array_equal(decided, rule)
    assert 0 < decided.sum() < near.size  # both outcomes occur
    assert sampler._Ptrs(1e9, 1 << 15).table is None  # past R = 2^15: gammaln throughout


def test_full_blocks_draw_poisson_at_a_large_lambda():
    """Seven blocks of 32768 candidates at lam = 5000 (one request): chi-square on 200 000
    draws, and the Skellam difference's variance."""
    draws = poisson(5_000.0, 200_000, source=fixed(13))
    assert chi_square_p(draws, stats.poisson(5_000.0).pmf) > 1e-3
    shares = skellam(10_000.0, 200_000, source=fixed(14))
    statistic = shares.size * shares.var() / 10_000.0
    low, high = stats.chi2.ppf([5e-5, 1 - 5e-5], shares.size)
    assert low <= statistic <= high
