"""``[data]``: which dataset, how it is split into test and training data, and how the
training data are spread over the clients (:mod:`securefl.data`).

``class_counts`` keeps, before partitioning, a seeded random ``class_counts[c]`` of the
training examples of each class ``c``: a dataset's own class proportions at a smaller size
(e.g. MNIST's unequal class sizes on the balanced ``mnist5k``), or any long tail.  Then
``partition = "shards"`` with ``shards_per_client = 1`` cuts the label-sorted set into equal
contiguous parts, and a part holds two classes wherever a class boundary falls inside it,
as in the non-IID sampler of Karimireddy et al. 2022 on the full MNIST.  That the counts fit the
dataset (one per class, none above what the training split holds) is checked when the data
are loaded (:func:`securefl.data.datasets.take_class_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from securefl.config.parse import check

__all__ = ["DataConfig"]


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["digits", "breast_cancer", "mnist", "mnist5k", "fashion_mnist", "cifar10",
                     "synthetic", "csv", "parquet", "npz", "image_folder", "python"] = "digits"
    path: str | None = None
    #: a site's own files (csv, npz, image_folder): see :mod:`securefl.data.files`
    test_path: str | None = None
    label: str = "label"
    features: tuple[str, ...] = ()
    num_classes: int | None = None
    num_clients: int = 10
    partition: Literal["iid", "dirichlet", "shards", "files"] = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    min_examples: int = 2
    #: training examples kept of each class 0..K-1, drawn from the seed; None keeps all
    class_counts: tuple[int, ...] | None = None
    synthetic_samples: int = 10_000
    synthetic_features: int = 32
    synthetic_classes: int = 10

    def validate(self) -> None:
        check(self.num_clients >= 1, "num_clients", f"must be >= 1, got {self.num_clients}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(self.shards_per_client >= 1, "shards_per_client",
              f"must be >= 1, got {self.shards_per_client}")
        check(0 < self.test_fraction < 1, "test_fraction",
              f"must be in (0, 1), got {self.test_fraction}")
        check(0 <= self.val_fraction < 1, "val_fraction",
              f"must be in [0, 1), got {self.val_fraction}")
        check(self.min_examples >= 1, "min_examples", f"must be >= 1, got {self.min_examples}")
        check(self.dataset not in ("mnist", "fashion_mnist", "cifar10") or bool(self.path),
              "path", f"is required for dataset {self.dataset!r} (a local folder)")
        check(self.dataset not in ("csv", "parquet", "npz", "image_folder") or bool(self.path),
              "path",
              f"is required for dataset {self.dataset!r} (the site's own file or folder)")
        check(self.partition != "files" or self.dataset in ("csv", "parquet", "npz",
                                                            "image_folder"),
              "partition", "= \"files\" needs dataset = \"csv\", \"parquet\", \"npz\" or "
              "\"image_folder\"")
        check(self.num_classes is None or self.num_classes >= 2, "num_classes",
              f"must be >= 2, got {self.num_classes}")
        if self.class_counts is not None:
            counts = list(self.class_counts)
            check(len(counts) >= 2 and min(counts) >= 0 and sum(counts) >= 1, "class_counts",
                  f"must list a count >= 0 for each class (at least 2), not all 0, got {counts}")
            check(self.partition != "files", "class_counts",
                  "cannot be combined with partition = \"files\" (each site keeps its file "
                  "whole)")
