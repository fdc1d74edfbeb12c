"""Bucketing (Karimireddy, He & Jaggi, ICLR 2022, Algorithm 1) against the algorithm by hand."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.aggregation import Bucketing, FedAvg, Krum, Median, build_aggregator

ROWS = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0], [10.0, 10.0], [1.0, 1.0]], np.float32)


def test_bucket_means_follow_the_permutation_by_hand() -> None:
    # default_rng(0).permutation(5) = [2, 4, 3, 0, 1]: buckets {x2, x4}, {x3, x0}, {x1}
    rule = Bucketing(bucket_size=2, inner=FedAvg(), rng=np.random.default_rng(0))
    means, sizes = rule.bucket(ROWS)
    np.testing.assert_array_equal(means, [[2.5, 2.5], [5.0, 5.0], [2.0, 0.0]])
    np.testing.assert_array_equal(sizes, [2, 2, 1])
    # FedAvg over buckets weighted by their sizes is the plain mean of all rows
    out = Bucketing(bucket_size=2, inner=FedAvg(), rng=np.random.default_rng(0))(ROWS)
    np.testing.assert_allclose(out, [3.4, 3.0], rtol=1e-6)
    # the coordinate-wise median of the three bucket means: median(2.5, 5, 2), median(2.5, 5, 0)
    out = Bucketing(bucket_size=2, inner=Median(), rng=np.random.default_rng(0))(ROWS)
    np.testing.assert_allclose(out, [2.5, 2.5], rtol=1e-6)


def test_each_call_draws_a_new_permutation() -> None:
    rule = Bucketing(bucket_size=2, inner="median", rng=np.random.default_rng(0))
    first, _ = rule.bucket(ROWS)
    second, _ = rule.bucket(ROWS)
    assert not np.array_equal(first, second)
    # the default generator is seeded from the OS CSPRNG: two rules draw differently
    wide = np.arange(40, dtype=np.float32).reshape(20, 2)
    assert not np.array_equal(Bucketing(bucket_size=2, inner="median").bucket(wide)[0],
                              Bucketing(bucket_size=2, inner="median").bucket(wide)[0])


def test_bucket_size_one_is_the_inner_rule() -> None:
    rows = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    out = Bucketing(bucket_size=1, inner="median")(rows)
    np.testing.assert_allclose(out, Median()(rows), rtol=1e-6)


def test_max_byzantine_is_the_inner_rules_on_the_buckets() -> None:
    # the paper's setting: n = 25, s = 2 gives 13 buckets, Krum with f = 5 needs 2f + 3 = 13
    rule = Bucketing(bucket_size=2, inner="krum", num_byzantine=5)
    assert isinstance(rule.inner, Krum) and rule.inner.num_byzantine == 5
    assert rule.buckets(25) == 13 and rule.min_clients == 25
    assert rule.max_byzantine(25) == 5 and rule.byzantine_note(25) == ""
    assert rule.max_byzantine(24) == 0 and "buckets of 2" in rule.byzantine_note(24)
    median = Bucketing(bucket_size=2, inner="median")
    assert median.max_byzantine(25) == 6 and median.max_byzantine(10) == 2
    out = rule(np.random.default_rng(2).normal(size=(25, 3)).astype(np.float32))
    assert out.shape == (3,) and out.dtype == np.float32


def test_krum_keeps_a_bucket_mean() -> None:
    rows = np.random.default_rng(3).normal(size=(25, 6)).astype(np.float32)
    rule = Bucketing(bucket_size=2, inner="krum", num_byzantine=5, rng=np.random.default_rng(4))
    out = rule(rows)
    means, _ = Bucketing(bucket_size=2, inner="krum", num_byzantine=5,
                         rng=np.random.default_rng(4)).bucket(rows)
    assert min(float(np.abs(out - m).max()) for m in means) < 1e-6


def test_config_builds_bucketing_with_an_inner_table() -> None:
    rule = build_aggregator("bucketing", bucket_size=2, num_byzantine=5,
                            inner={"rule": "centered_clipping", "tau": 0.1})
    assert isinstance(rule, Bucketing) and rule.inner.stateful and rule.stateful


@pytest.mark.parametrize(("options", "message"), [
    ({"bucket_size": 0, "inner": "median"}, "bucket_size must be >= 1"),
    ({"bucket_size": 2.0, "inner": "median"}, "bucket_size must be an int"),
    ({"bucket_size": 2, "inner": "bucketing"}, "other than 'nnm' or 'bucketing'"),
    ({"bucket_size": 2, "inner": "nnm"}, "other than 'nnm' or 'bucketing'"),
])
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        Bucketing(**options)  # type: ignore[arg-type]
