"""Data-poisoning attacks: byzantine clients train honestly on poisoned data.

* :class:`LabelFlip` relabels training examples (Tolpegin et al., ESORICS 2020).
* :class:`PixelTrigger` stamps a pixel patch on a fraction of the training images and relabels
  them to a target class (the BadNets trigger of Gu et al. 2017, used in federated learning by
  Bagdasaryan et al., AISTATS 2020).  Its attack success rate is measured on triggered test
  inputs whose true class is not the target (:meth:`PixelTrigger.success_rate`).

Both map a :class:`~securefl.data.Dataset` to a poisoned copy; the input is never modified.
"""

from __future__ import annotations

import numpy as np

from securefl.data import Dataset
from securefl.errors import DataError

__all__ = ["LabelFlip", "PixelTrigger"]


def _fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _chosen(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``round(fraction * n)`` examples (all when ``fraction == 1``), sorted."""
    count = n if fraction == 1 else round(fraction * n)
    return np.sort(rng.choice(n, size=count, replace=False))


class LabelFlip:
    """Label flipping: ``y -> (num_classes - 1 - y)`` by default, or ``y -> target`` for the
    examples of class ``source`` (the targeted flip of Tolpegin et al. 2020), on a
    ``fraction`` of the training examples.
    """

    def __init__(self, *, fraction: float = 1.0, source: int | None = None,
                 target: int | None = None) -> None:
        if (source is None) != (target is None):
            raise ValueError("source and target must be given together (or neither)")
        if source is not None and source == target:
            raise ValueError(f"source and target must differ, got {source}")
        self.fraction = _fraction("fraction", fraction)
        self.source, self.target = source, target

    def __call__(self, data: Dataset, *, rng: np.random.Generator) -> Dataset:
        labels = data.labels.copy()
        for label in (self.source, self.target):
            if label is not None and not 0 <= label < data.num_classes:
                raise DataError(f"label {label} is outside 0..{data.num_classes - 1}")
        picked = _chosen(len(labels), self.fraction, rng)
        if self.source is None:
            labels[picked] = data.num_classes - 1 - labels[picked]
        else:
            picked = picked[labels[picked] == self.source]
            labels[picked] = self.target
        return Dataset(data.features, labels, data.num_classes, data.name)

    def __repr__(self) -> str:
        return f"LabelFlip(fraction={self.fraction}, source={self.source}, target={self.target})"


class PixelTrigger:
    """Pixel-trigger backdoor: a ``size x size`` patch at the bottom-right corner of every
    channel is set to ``value``; poisoned training examples are relabelled ``target``.

    A ``fraction`` of each byzantine client's training examples is poisoned (the rest stay
    clean, so the poisoned model keeps its main-task accuracy, as in Bagdasaryan et al.).
    """

    def __init__(self, *, target: int = 0, size: int = 2, value: float = 1.0,
                 fraction: float = 0.5) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be an int >= 0, got {target!r}")
        self.target, self.size, self.value = target, size, float(value)
        self.fraction = _fraction("fraction", fraction)

    def stamp(self, features: np.ndarray) -> np.ndarray:
        """A copy of ``(N, C, H, W)`` images with the trigger patch applied."""
        if features.ndim != 4 or min(features.shape[2:]) < self.size:
            raise DataError(f"a {self.size}x{self.size} pixel trigger needs (N, C, H, W) images "
                            f"of at least that size, got shape {features.shape}")
        out = features.copy()
        out[:, :, -self.size:, -self.size:] = self.value
        return out

    def __call__(self, data: Dataset, *, rng: np.random.Generator) -> Dataset:
        if not self.target < data.num_classes:
            raise DataError(f"target {self.target} is outside 0..{data.num_classes - 1}")
        picked = _chosen(len(data), self.fraction, rng)
        features, labels = data.features.copy(), data.labels.copy()
        features[picked] = self.stamp(data.features[picked])
        labels[picked] = self.target
        return Dataset(features, labels, data.num_classes, data.name)

    def triggered_test(self, test: Dataset) -> Dataset:
        """Test inputs of every class but ``target``, triggered, keeping their true labels."""
        keep = np.flatnonzero(test.labels != self.target)
        return Dataset(self.stamp(test.features[keep]), test.labels[keep], test.num_classes,
                       test.name)

    def success_rate(self, predictions: np.ndarray) -> float:
        """Attack success rate: the fraction of triggered non-target inputs classified as
        ``target`` (``predictions`` on :meth:`triggered_test`)."""
        predictions = np.asarray(predictions)
        if predictions.size == 0:
            raise ValueError("no triggered test inputs to score")
        return float((predictions == self.target).mean())

    def __repr__(self) -> str:
        return (f"PixelTrigger(target={self.target}, size={self.size}, value={self.value}, "
                f"fraction={self.fraction})")
