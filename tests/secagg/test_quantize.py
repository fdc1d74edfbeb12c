"""Quantization into Z_{2**32}: bounds, no wrap-around, unbiased stochastic rounding."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.secagg.prg import keystream
from securefl.secagg.quantize import MAX_SUM, Quantizer, levels_for


def dither(count: int) -> np.ndarray:
    return keystream(os.urandom(16), count)


def test_levels_leave_headroom_and_raise_when_the_sum_could_wrap():
    assert levels_for(1000, bits="auto") == MAX_SUM // 1000
    assert levels_for(100, bits=24) == (1 << 23) - 1
    assert levels_for(256, bits=24) * 256 <= MAX_SUM
    with pytest.raises(ValueError, match="overflow"):
        levels_for(257, bits=24)
    with pytest.raises(ValueError, match="bits"):
        levels_for(10, bits=40)


def test_worst_case_sum_of_n_clients_decodes_exactly():
    n = 50
    quantizer = Quantizer(clip=1.0, max_weight=1.0, levels=levels_for(n, bits="auto"))
    d = 8
    total = np.zeros(d + 1, np.uint32)
    for sign in (-1.0, 1.0):
        total[:] = 0
        for _ in range(n):
            total += quantizer.encode(np.full(d, sign * 5.0, np.float32), 1.0, dither(d + 1))
        weighted, weight = quantizer.decode(total)
        np.testing.assert_allclose(weighted, sign * n, rtol=0, atol=n * quantizer.step)
        assert weight == pytest.approx(n, abs=n * quantizer.weight_step)


def test_error_below_one_step_and_unbiased():
    quantizer = Quantizer(clip=0.5, max_weight=100.0, levels=1000)
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, 20_000).astype(np.float32)
    words = quantizer.encode(x, 40.0, dither(x.size + 1))
    weighted, weight = quantizer.decode(words)
    error = weighted - 40.0 * x.astype(np.float64)
    assert np.abs(error).max() < quantizer.step
    assert abs(error.mean()) < 4 * quantizer.step / np.sqrt(x.size)
    assert weight == 40.0  # 400 levels exactly


def test_encode_rejects_bad_weight_and_update():
    quantizer = Quantizer(clip=1.0, max_weight=10.0, levels=100)
    with pytest.raises(ValueError, match="max_weight"):
        quantizer.encode(np.zeros(3, np.float32), 11.0, dither(4))
    with pytest.raises(ValueError, match="finite"):
        quantizer.encode(np.array([0, np.nan, 0], np.float32), 1.0, dither(4))
    with pytest.raises(ValueError, match="dither"):
        quantizer.encode(np.zeros(3, np.float32), 1.0, dither(3))


@settings(max_examples=300, deadline=None)
@given(clip=st.one_of(st.sampled_from([0.05, 0.1, 0.3, 1 / 3, 1e-3]),
                      st.floats(1e-6, 1e4, allow_nan=False, allow_infinity=False)),
       max_weight=st.one_of(st.sampled_from([1.0, 0.1, 1e5]), st.floats(1e-3, 1e6)),
       n=st.integers(1, 2000))
def test_attack5_every_word_stays_within_L_and_the_worst_sum_cannot_wrap(clip, max_weight, n):
    """Every coordinate at +-clip as float32 holds it (float32(0.1) > 0.1), or beyond, at the
    maximum weight, rounded up wherever it can be (an all-zero dither): ``|q| <= L``."""
    levels = levels_for(n, bits="auto")
    quantizer = Quantizer(clip=clip, max_weight=max_weight, levels=levels)
    edge = np.float32(clip)
    above = np.nextafter(edge, np.float32(np.inf))
    delta = np.array([edge, -edge, above, -above, 2 * edge, -4 * edge,
                      np.float32(3.4e38), np.float32(-3.4e38)], np.float32)
    words = quantizer.encode(delta, max_weight, np.zeros(delta.size + 1, np.uint32))
    signed = words.view(np.int32).astype(np.int64)
    assert np.abs(signed).max() <= levels
    # n sites all sending the same extreme words: the 32-bit sum decodes exactly
    total = (words.astype(np.uint64) * n % (1 << 32)).astype(np.uint32)
    np.testing.assert_array_equal(total.view(np.int32).astype(np.int64), n * signed)
    weighted, weight = quantizer.decode(total)
    assert np.all(np.sign(weighted[:2]) == [1, -1]) and weight > 0


@pytest.mark.parametrize("d", [0, 1, 8191, 8192, 20_001])
def test_encoding_in_place_over_the_dither_gives_the_same_words(d: int) -> None:
    quantizer = Quantizer(clip=0.1, max_weight=50.0, levels=levels_for(7, bits="auto"))
    x = np.random.default_rng(d).normal(0, 0.1, d).astype(np.float32)
    noise = dither(d + 1)
    expected = quantizer.encode(x, 33.0, noise)
    words = quantizer.encode(x, 33.0, noise, in_place=True)
    assert words.dtype == np.uint32 and np.shares_memory(words, noise)
    np.testing.assert_array_equal(words, expected)
    with pytest.raises(ValueError, match="writeable"):
        quantizer.encode(x, 1.0, _read_only(d + 1), in_place=True)


def _read_only(count: int) -> np.ndarray:
    words = np.zeros(count, np.uint32)
    words.flags.writeable = False
    return words
