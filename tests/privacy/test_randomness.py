"""The CSPRNG behind deployed DP-SGD: a fresh key per request, exact uniform grid, Gaussians
of the right scale (Holohan and Braghin's sum of four), Poisson masks at rate q."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.privacy.randomness import GAUSSIAN_SUMMANDS, SecurePoissonSampler, SecureRandom
from tests.privacy.test_skellam import fixed_source


def test_every_request_has_its_own_key() -> None:
    source = SecureRandom()
    assert not np.array_equal(source.words(64), source.words(64))
    fixed = fixed_source(b"fixed"), fixed_source(b"fixed")
    # a fixed entropy source (tests only) makes the stream reproducible: AES-256-CTR
    np.testing.assert_array_equal(fixed[0].words(64), fixed[1].words(64))
    assert not np.array_equal(fixed[0].words(64), fixed[0].words(64))
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(entropy=lambda n: b"short").words(1)


def test_uniforms_lie_on_the_53_bit_grid() -> None:
    u = fixed_source(b"uniform").uniform(100_000)  # fixed keys: statistical bounds reproducible
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    np.testing.assert_array_equal(u * 2.0 ** 53, np.floor(u * 2.0 ** 53))
    assert abs(u.mean() - 0.5) < 0.005


def test_gaussians_have_the_requested_scale() -> None:
    assert GAUSSIAN_SUMMANDS == 4
    draws = fixed_source(b"gaussian").gaussian(400_000, 3.0).numpy()  # fixed keys, as above
    assert abs(draws.mean()) < 0.02
    assert draws.std() == pytest.approx(3.0, rel=0.005)
    fourth = np.mean((draws / draws.std()) ** 4)
    assert fourth == pytest.approx(3.0, abs=0.05)  # Gaussian kurtosis
    assert SecureRandom().gaussian(0, 1.0).numel() == 0


def test_poisson_sampler_takes_each_example_at_rate_q() -> None:
    sampler = SecurePoissonSampler(num_samples=1000, sample_rate=0.05, steps=200,
                                   source=fixed_source(b"poisson"))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(50, rel=0.05)
    assert all(b == sorted(set(b)) and (not b or (0 <= b[0] and b[-1] < 1000)) for b in batches)
    with pytest.raises(ValueError):
        SecurePoissonSampler(num_samples=10, sample_rate=0.0, steps=1, source=SecureRandom())
