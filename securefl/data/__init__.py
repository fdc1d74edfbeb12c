"""Data for simulations: load a dataset, hold out a test set, partition the rest over clients."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from securefl.config import DataConfig
from securefl.data import partition
from securefl.data.datasets import (
    Dataset,
    load_breast_cancer,
    load_cifar10,
    load_digits,
    load_mnist,
    load_mnist5k,
    make_synthetic,
    split,
)
from securefl.data.files import FileRecord, load_source
from securefl.errors import DataError

__all__ = ["ClientData", "Dataset", "FederatedData", "FileRecord", "federate", "load_dataset",
           "partition"]

FILE_SOURCES = ("csv", "npz", "image_folder")


@dataclass(frozen=True)
class ClientData:
    train: Dataset
    val: Dataset


@dataclass(frozen=True)
class FederatedData:
    clients: dict[str, ClientData]
    test: Dataset
    num_classes: int
    shape: tuple[int, ...]
    #: the files read (name, rows, SHA-256), for the run directory's provenance
    files: tuple[FileRecord, ...] = field(default=())


def load_dataset(config: DataConfig, *, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """(train, test) for the configured dataset; embedded sets are split ``test_fraction``."""
    return _load(config, rng=rng)[:2]


def _load(config: DataConfig, *,
          rng: np.random.Generator) -> tuple[Dataset, Dataset, tuple[FileRecord, ...]]:
    if config.dataset in FILE_SOURCES:
        return _load_files(config, rng=rng)
    if config.dataset == "python":
        raise DataError("[data] dataset = \"python\" records data given as Python objects; "
                        "pass them again with securefl.own.run(..., data=...)")
    return (*_load_embedded(config, rng=rng), ())


def _load_files(config: DataConfig, *,
                rng: np.random.Generator) -> tuple[Dataset, Dataset, tuple[FileRecord, ...]]:
    """A site's own file; the test set is ``test_path`` or a stratified ``test_fraction``."""
    options = {"label": config.label, "features": config.features,
               "num_classes": config.num_classes}
    full, record = load_source(config.dataset, str(config.path), **options)
    if config.test_path is None:
        train, test = split(full, config.test_fraction, rng=rng)
        return train, test, (record,)
    test, test_record = load_source(config.dataset, config.test_path, **options)
    if test.shape != full.shape:
        raise DataError(f"{config.test_path}: examples of shape {test.shape}, but "
                        f"{config.path} has {full.shape}")
    classes = max(full.num_classes, test.num_classes)
    fix = lambda d: Dataset(d.features, d.labels, classes, d.name)  # noqa: E731
    return fix(full), fix(test), (record, test_record)


def _load_embedded(config: DataConfig, *,
                   rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    if config.dataset in ("mnist", "fashion_mnist"):
        return load_mnist(str(config.path), name=config.dataset)
    if config.dataset == "cifar10":
        return load_cifar10(str(config.path))
    if config.dataset == "synthetic":
        full = make_synthetic(num_samples=config.synthetic_samples,
                              num_features=config.synthetic_features,
                              num_classes=config.synthetic_classes, rng=rng)
    elif config.dataset == "breast_cancer":
        full = load_breast_cancer()
    elif config.dataset == "mnist5k":
        full = load_mnist5k()
    else:
        full = load_digits()
    train, test = split(full, config.test_fraction, rng=rng)
    if config.dataset == "breast_cancer":
        train, test = _standardise(train, test)
    return train, test


def _standardise(train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
    """Scale features with the training split's mean and std only (no test leakage).

    In a real federation each site would use its own or securely aggregated statistics; the
    simulation uses the pooled training statistics as a stand-in.
    """
    mean = train.features.mean(axis=0)
    std = train.features.std(axis=0) + 1e-8
    scale = lambda d: Dataset(((d.features - mean) / std).astype(np.float32),  # noqa: E731
                              d.labels, d.num_classes, d.name)
    return scale(train), scale(test)


def federate(config: DataConfig, *, seed: int,
             source: tuple[Dataset, Dataset | None] | None = None) -> FederatedData:
    """Load, hold out the test set, partition over ``num_clients`` and split each client's
    shard into train and validation (``val_fraction``), all from one seeded stream.

    ``source`` replaces the configured dataset with ``(data, test)`` already validated by
    :func:`securefl.data.own.as_dataset`; without ``test``, a stratified ``test_fraction``
    of ``data`` is held out, as for the embedded sets.
    """
    rng = np.random.default_rng([seed, 0xDA7A])
    files: tuple[FileRecord, ...] = ()
    if source is None:
        train, test, files = _load(config, rng=rng)
    elif source[1] is None:
        train, test = split(source[0], config.test_fraction, rng=rng)
    else:
        train, test = source  # type: ignore[assignment]
    least = config.min_examples
    if config.partition == "iid":
        parts = partition.iid(train.labels, config.num_clients, rng=rng, min_examples=least)
    elif config.partition == "dirichlet":
        parts = partition.dirichlet(train.labels, config.num_clients, alpha=config.alpha,
                                    rng=rng, min_examples=least)
    else:
        parts = partition.shards(train.labels, config.num_clients,
                                 shards_per_client=config.shards_per_client, rng=rng,
                                 min_examples=least)
    clients = {}
    width = len(str(config.num_clients - 1))
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        n_val = round(config.val_fraction * len(idx)) if len(idx) > 1 else 0
        n_val = min(n_val, len(idx) - 1)
        clients[f"client-{i:0{width}d}"] = ClientData(train.subset(np.sort(idx[n_val:])),
                                                      train.subset(np.sort(idx[:n_val])))
    return FederatedData(clients, test, train.num_classes, train.shape, files)
