"""Data for simulations: load a dataset, hold out a test set, partition the rest over clients."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

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
    take_class_counts,
)
from securefl.data.files import FileRecord, load_source
from securefl.errors import DataError

__all__ = ["ClientData", "Dataset", "FederatedData", "FileRecord", "federate", "load_dataset",
           "partition"]

FILE_SOURCES = ("csv", "parquet", "npz", "image_folder")


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
    full, record = _source(config, str(config.path))
    if config.test_path is None:
        train, test = split(full, config.test_fraction, rng=rng)
        return train, test, (record,)
    test, test_record = _source(config, config.test_path)
    if test.shape != full.shape:
        raise DataError(f"{config.test_path}: examples of shape {test.shape}, but "
                        f"{config.path} has {full.shape}")
    classes = max(full.num_classes, test.num_classes)
    fix = lambda d: Dataset(d.features, d.labels, classes, d.name)  # noqa: E731
    return fix(full), fix(test), (record, test_record)


def _source(config: DataConfig, path: str | Path) -> tuple[Dataset, FileRecord]:
    return load_source(config.dataset, path, label=config.label, features=config.features,
                       num_classes=config.num_classes)


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
    """Load, hold out the test set, keep ``class_counts`` of each class of the rest (when
    given), partition over ``num_clients`` and split each client's shard into train and
    validation (``val_fraction``), all from one seeded stream.

    ``source`` replaces the configured dataset with ``(data, test)`` already validated by
    :func:`securefl.data.own.as_dataset`; without ``test``, a stratified ``test_fraction``
    of ``data`` is held out, as for the embedded sets.  ``partition = "files"``: each
    file matching the ``path`` pattern is one client (:func:`_per_file`).
    """
    rng = np.random.default_rng([seed, 0xDA7A])
    if config.partition == "files" and source is None:
        return _per_file(config, rng=rng)
    files: tuple[FileRecord, ...] = ()
    if source is None:
        train, test, files = _load(config, rng=rng)
    elif source[1] is None:
        train, test = split(source[0], config.test_fraction, rng=rng)
    else:
        train, test = source  # type: ignore[assignment]
    if config.class_counts is not None:
        train = take_class_counts(train, config.class_counts, rng=rng)
    least = config.min_examples
    if config.partition == "iid":
        parts = partition.iid(train.labels, config.num_clients, rng=rng, min_examples=least)
    elif config.partition == "dirichlet":
        parts = partition.dirichlet(train.labels, config.num_clients, alpha=config.alpha,
                                    rng=rng, min_examples=least)
    elif config.partition == "shards":
        parts = partition.shards(train.labels, config.num_clients,
                                 shards_per_client=config.shards_per_client, rng=rng,
                                 min_examples=least)
    else:
        raise DataError("[data] partition = \"files\" needs the site's own files "
                        "(dataset = \"csv\", \"parquet\", \"npz\" or \"image_folder\")")
    width = len(str(config.num_clients - 1))
    clients = {f"client-{i:0{width}d}": _train_val(train.subset(idx), config, rng=rng)
               for i, idx in enumerate(parts)}
    return FederatedData(clients, test, train.num_classes, train.shape, files)


def _train_val(shard: Dataset, config: DataConfig, *, rng: np.random.Generator) -> ClientData:
    """A client's shard, shuffled and split into train and ``val_fraction`` validation."""
    idx = rng.permutation(len(shard))
    n_val = round(config.val_fraction * len(idx)) if len(idx) > 1 else 0
    n_val = min(n_val, len(idx) - 1)
    return ClientData(shard.subset(np.sort(idx[n_val:])), shard.subset(np.sort(idx[:n_val])))


def _per_file(config: DataConfig, *, rng: np.random.Generator) -> FederatedData:
    """``partition = "files"``: every file matching ``path`` (a glob, sorted) is the data of
    one client named by the file's stem, as each site holds its own file in a deployment.
    The test set is ``test_path``, or the pooled stratified ``test_fraction`` of each file."""
    paths = sorted(Path(p) for p in glob.glob(str(config.path)))
    if len(paths) != config.num_clients:
        raise DataError(f"[data] path {config.path!r} matches {len(paths)} files, but "
                        f"num_clients = {config.num_clients} (partition = \"files\": one file "
                        "per client)")
    loaded = [_source(config, p) for p in paths]
    shapes = {d.shape for d, _ in loaded}
    if len(shapes) > 1:
        raise DataError(f"[data] path {config.path!r}: files hold examples of different "
                        f"shapes {sorted(shapes)}")
    records = [r for _, r in loaded]
    if config.test_path is not None:
        test, record = _source(config, config.test_path)
        records.append(record)
        parts = [d for d, _ in loaded]
    else:
        halves = [split(d, config.test_fraction, rng=rng) for d, _ in loaded]
        parts = [h[0] for h in halves]
        held = [h[1] for h in halves]
        test = Dataset(np.concatenate([h.features for h in held]),
                       np.concatenate([h.labels for h in held]),
                       max(h.num_classes for h in held), "test")
    classes = max([d.num_classes for d in parts] + [test.num_classes])
    same = lambda d: Dataset(d.features, d.labels, classes, d.name)  # noqa: E731
    clients = {p.stem: _train_val(same(d), config, rng=rng) for p, d in zip(paths, parts,
                                                                          strict=True)}
    if len(clients) != len(paths):
        raise DataError(f"[data] path {config.path!r}: two files share a name")
    return FederatedData(clients, same(test), classes, parts[0].shape, tuple(records))
