import gzip
import struct

import numpy as np
import pytest

from securefl.config import DataConfig
from securefl.data import federate
from securefl.data.cifar import read_batch
from securefl.data.datasets import load_mnist, make_synthetic
from securefl.errors import DataError


def test_digits_federation_shapes_and_cover():
    data = federate(DataConfig(num_clients=10), seed=0)
    assert data.shape == (1, 8, 8) and data.num_classes == 10
    total = sum(len(c.train) + len(c.val) for c in data.clients.values()) + len(data.test)
    assert total == 1797
    assert 0.19 < len(data.test) / 1797 < 0.21
    assert data.test.features.min() >= 0 and data.test.features.max() <= 1


def test_breast_cancer_is_standardised_on_train_only():
    data = federate(DataConfig(dataset="breast_cancer", num_clients=5, partition="iid"), seed=0)
    train = np.concatenate([c.train.features for c in data.clients.values()]
                           + [c.val.features for c in data.clients.values()])
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    assert data.shape == (30,) and data.num_classes == 2


def test_synthetic_is_seeded():
    a = make_synthetic(num_samples=50, num_features=4, num_classes=3,
                       rng=np.random.default_rng(1))
    b = make_synthetic(num_samples=50, num_features=4, num_classes=3,
                       rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.features, b.features)
    assert a.features.shape == (50, 4) and set(np.unique(a.labels)) <= {0, 1, 2}


def _idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_mnist_idx_folder(tmp_path):
    for prefix, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
             np.full((n, 28, 28), 255, np.uint8), 0x08)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8), 0x08)
    train, test = load_mnist(tmp_path)
    assert train.features.shape == (6, 1, 28, 28) and test.labels.tolist() == [0, 1, 2, 3]
    assert train.features.max() == 1.0


def test_missing_mnist_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_mnist(tmp_path / "nope")


def test_cifar_binary_batch(tmp_path):
    record = np.concatenate([[7], np.full(3072, 51)]).astype(np.uint8)
    (tmp_path / "data_batch_1.bin").write_bytes(np.tile(record, 3).tobytes())
    images, labels = read_batch(tmp_path / "data_batch_1")
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [7, 7, 7]
    assert images.max() == pytest.approx(0.2)


def test_cifar_python_batch_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing"):
        read_batch(tmp_path / "data_batch_1")
    ok = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(ok))
    images, labels = read_batch(tmp_path / "test_batch")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]


def test_embedded_files_match_scikit_learn_loaders():
    from sklearn.datasets import load_breast_cancer as sk_cancer
    from sklearn.datasets import load_digits as sk_digits

    from securefl.data.datasets import load_breast_cancer, load_digits

    digits, reference = load_digits(), sk_digits()
    np.testing.assert_array_equal(digits.features.reshape(-1, 64) * 16, reference.data)
    np.testing.assert_array_equal(digits.labels, reference.target)
    cancer, reference = load_breast_cancer(), sk_cancer()
    np.testing.assert_allclose(cancer.features, reference.data, rtol=1e-6)
    np.testing.assert_array_equal(cancer.labels, reference.target)
