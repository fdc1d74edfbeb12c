import numpy as np
import pytest

from securefl.data import partition
from securefl.errors import DataError

LABELS = np.repeat(np.arange(10), 100)


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


@pytest.mark.parametrize("make", [
    lambda rng: partition.iid(LABELS, 10, rng=rng),
    lambda rng: partition.dirichlet(LABELS, 10, alpha=0.5, rng=rng),
    lambda rng: partition.dirichlet(LABELS, 10, alpha=100.0, rng=rng),
    lambda rng: partition.shards(LABELS, 10, shards_per_client=2, rng=rng),
])
def test_every_sample_assigned_exactly_once_and_seeded(make):
    a = make(np.random.default_rng(5))
    b = make(np.random.default_rng(5))
    _assert_exact_cover(a, len(LABELS))
    assert all(len(p) > 0 for p in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _mean_skew(parts):
    """Mean total-variation distance between a client's label histogram and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    return np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum()
                    for p in parts])


def test_class_skew_grows_as_alpha_falls():
    skews = [np.mean([_mean_skew(partition.dirichlet(LABELS, 10, alpha=a,
                                                     rng=np.random.default_rng(s)))
                      for s in range(5)]) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.15 < skews[1] < skews[2]
    assert skews[2] > 0.6


def test_shards_give_few_classes():
    parts = partition.shards(LABELS, 10, shards_per_client=2, rng=np.random.default_rng(0))
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 4


def test_empty_client_is_a_clear_error():
    with pytest.raises(DataError, match="leaves client"):
        partition.iid(np.arange(3), 5, rng=np.random.default_rng(0), min_examples=1)
    with pytest.raises(DataError, match="alpha"):
        partition.dirichlet(np.repeat(np.arange(2), 5), 8, alpha=0.01,
                            rng=np.random.default_rng(0), min_examples=2, max_tries=3)
