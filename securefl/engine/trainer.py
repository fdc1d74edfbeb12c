"""Local training on a client's shard: global vector in, :class:`Update` (the delta) out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from securefl.data import Dataset
from securefl.engine.protection import Update
from securefl.objective import Objective, scalar
from securefl.params import Layout, flatten, unflatten

__all__ = ["LocalTrainer", "RoundRewind", "Trainer", "evaluate_model", "torch_threads"]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous count
    (the setting is process-wide)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@runtime_checkable
class Trainer(Protocol):
    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        """Train from ``parameters``; return ``Update(local - global, weight)`` and metrics."""
        ...

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        """``(num_examples, mean loss, accuracy)`` on the client's validation split."""
        ...


def evaluate_model(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *,
                   batch_size: int = 1024) -> tuple[int, float, float]:
    """``(n, mean cross-entropy, accuracy)`` of ``model`` on a labelled set."""
    n = len(labels)
    if n == 0:
        return 0, float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(features[start:start + batch_size])
            target = labels[start:start + batch_size]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())
    return n, loss_sum / n, correct / n


class LocalTrainer:
    """Mini-batch SGD/Adam for ``epochs`` passes over the client's training split.

    Batches are drawn by shuffling with the trainer's own ``torch.Generator`` (seeded per
    client, on the CPU whatever the ``device``), so runs are reproducible without touching
    the global RNG.  ``device`` holds the model and the data (:mod:`securefl.device`);
    ``objective`` is the loss and step (:mod:`securefl.objective`; cross-entropy by default).
    The weight of the update is the number of training examples (FedAvg weighting).
    """

    def __init__(self, model: nn.Module, train: Dataset, val: Dataset, *, epochs: int,
                 batch_size: int, lr: float, optimizer: str = "sgd", momentum: float = 0.0,
                 weight_decay: float = 0.0, seed: int,
                 device: torch.device | str = "cpu", objective: Objective | None = None) -> None:
        if len(train) == 0:
            raise ValueError("a client needs at least one training example")
        self.objective = objective or Objective()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.layout = Layout.of(model)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

        self.features, self.labels = tensor(train.features), tensor(train.labels)
        self.val_features, self.val_labels = tensor(val.features), tensor(val.labels)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer, self.momentum, self.weight_decay = optimizer, momentum, weight_decay
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def make_optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        unflatten(self.model, parameters, self.layout)
        optimizer = self.make_optimizer(self.model.parameters())
        self.model.train()
        n, loss_sum, steps = self.num_examples, 0.0, 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, self.batch_size):
                batch = order[start:start + self.batch_size].to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = scalar(self.objective.step(self.model, self.features[batch],
                                                  self.labels[batch], self.objective.loss))
                loss.backward()
                optimizer.step()
                loss_sum += loss.item()
                steps += 1
        delta = flatten(self.model) - parameters
        return Update(delta.astype(np.float32), float(n)), {"train_loss": loss_sum / steps}

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.layout)
        return evaluate_model(self.model, self.val_features, self.val_labels)


class RoundRewind:
    """Trainer wrapper: a round trained again starts from the same random state.

    When round ``t`` is asked for again (a server that resumed after a crash, or one that
    redoes a round that aborted before any reveal), the trainer restores its batch-shuffling
    generator to where it stood before the lost attempt, so the redone round (and the final
    model) equals an uninterrupted run's.
    """

    def __init__(self, base: LocalTrainer) -> None:
        self.base = base
        self._before: tuple[int, torch.Tensor] | None = None

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        generator = self.base.generator
        if self._before is not None and self._before[0] == round:
            generator.set_state(self._before[1])
        else:
            self._before = (round, generator.get_state())
        return self.base.fit(parameters, round=round)

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return self.base.evaluate(parameters)
