"""Local training on a client's shard: global vector in, :class:`Update` (the delta) out."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from securefl.data import Dataset
from securefl.engine.protection import Update
from securefl.errors import ConfigError
from securefl.models import seed_dropout
from securefl.objective import Objective, scalar
from securefl.vector import Layout, flatten, unflatten

__all__ = ["LocalTask", "LocalTrainer", "RoundRewind", "Trainer", "derive_seed", "evaluate_model",
           "torch_threads"]


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


def derive_seed(*parts: int) -> int:
    """A 32-bit seed for one purpose, ``SeedSequence(parts).generate_state(1)[0]``: a site's
    seed from ``(run seed, its index)``, its dropout generator's from ``(site seed, 1)``, the
    shared masks' from ``(run seed, 2, round // period)``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass(frozen=True)
class LocalTask:
    """Everything a local round trains on, handed explicitly to a trainer that wraps it (the
    DP-SGD trainer), as Opacus's ``make_private`` receives a module, an optimizer and a data
    loader: the model and its layout, the training and validation tensors on ``device``,
    ``epochs`` passes of minibatches of ``batch_size``, the optimizer factory, the shuffling
    generator and the objective (loss and step)."""

    model: nn.Module
    layout: Layout
    features: torch.Tensor
    labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    epochs: int
    batch_size: int
    make_optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]
    generator: torch.Generator
    objective: Objective
    device: torch.device
    #: called with the round's number before it trains (:meth:`LocalTrainer.begin_round`)
    begin_round: Callable[[int], None]


class LocalTrainer:
    """Mini-batch SGD/Adam for ``epochs`` passes over the client's training split, or, with
    ``local_steps``, for exactly that many minibatch steps per round (distributed SGD:
    ``local_steps = 1`` sends ``-lr g`` for one minibatch gradient ``g``, as in Baruch et al.
    2019 and Karimireddy et al. 2022).  The minibatches of consecutive rounds continue one
    shuffled pass after another.

    ``keep_momentum``: the optimizer's state (SGD's momentum buffer ``m <- beta m + g``)
    lives on the client across rounds instead of restarting each round, which is worker
    momentum (Karimireddy, He & Jaggi, ICML 2021): with one local step the update is
    ``-lr m_t``.  The server never sees ``m``.

    Batches are drawn by shuffling with the trainer's own ``torch.Generator`` (seeded per
    client, on the CPU whatever the ``device``), so runs are reproducible without touching
    the global RNG; the model's dropout masks (:class:`securefl.models.SeededDropout`) come
    from a second generator the trainer owns, seeded from ``(seed, 1)``, so every site and
    every step draws its own masks; with ``shared_masks = (seed, period)`` that generator is
    reseeded from ``(seed, round // period)`` as each round begins instead, so sites with
    the same ``seed`` draw the same masks (``[model] dropout_masks = "shared"``).  ``device``
    holds the model and the data (:mod:`securefl.device`); ``objective`` is the loss and
    step (:mod:`securefl.objective`; cross-entropy by default).  The weight of the update is
    the number of training examples (FedAvg weighting).
    """

    def __init__(self, model: nn.Module, train: Dataset, val: Dataset, *, epochs: int,
                 batch_size: int, lr: float, optimizer: str = "sgd", momentum: float = 0.0,
                 weight_decay: float = 0.0, local_steps: int | None = None,
                 keep_momentum: bool = False, seed: int,
                 device: torch.device | str = "cpu", objective: Objective | None = None,
                 shared_masks: tuple[int, int] | None = None) -> None:
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
        self.dropout = torch.Generator().manual_seed(derive_seed(seed, 1))
        if seed_dropout(self.model, self.dropout) == 0 and shared_masks is not None:
            raise ConfigError("[model] dropout_masks = \"shared\": the model has no "
                              "SeededDropout layer to draw masks for")
        self.shared_masks = shared_masks
        self.local_steps, self.keep_momentum = local_steps, keep_momentum
        self._order = torch.empty(0, dtype=torch.long)  # the rest of the current pass
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def make_optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def begin_round(self, round: int) -> None:
        """Reseed the shared dropout masks for ``round`` (nothing with per-site masks)."""
        if self.shared_masks is not None:
            seed, period = self.shared_masks
            self.dropout.manual_seed(derive_seed(seed, 2, round // period))

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        self.begin_round(round)
        unflatten(self.model, parameters, self.layout)
        if self.keep_momentum:
            if self._optimizer is None:
                self._optimizer = self.make_optimizer(self.model.parameters())
            optimizer = self._optimizer
        else:
            optimizer = self.make_optimizer(self.model.parameters())
        self.model.train()
        losses = [self._step(optimizer, batch.to(self.device)) for batch in self._batches()]
        delta = flatten(self.model) - parameters
        return (Update(delta.astype(np.float32), float(self.num_examples)),
                {"train_loss": sum(losses) / len(losses)})

    def _batches(self) -> Iterator[torch.Tensor]:
        n = self.num_examples
        if self.local_steps is None:  # the FL setting: whole passes over the shard
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=self.generator)
                for start in range(0, n, self.batch_size):
                    yield order[start:start + self.batch_size]
            return
        for _ in range(self.local_steps):
            if len(self._order) == 0:
                self._order = torch.randperm(n, generator=self.generator)
            batch, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
            yield batch

    def _step(self, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = scalar(self.objective.step(self.model, self.features[batch], self.labels[batch],
                                          self.objective.loss))
        loss.backward()
        optimizer.step()
        return float(loss.item())

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any] | None]:
        """Everything a round changes besides the model: the shuffling and dropout
        generators, the rest of the current pass and the kept optimizer state (copied)."""
        state = None if self._optimizer is None else copy.deepcopy(self._optimizer.state_dict())
        return self.generator.get_state(), self.dropout.get_state(), self._order.clone(), state

    def restore(self, snap: tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                  dict[str, Any] | None]) -> None:
        generator, dropout, order, state = snap
        self.generator.set_state(generator)
        self.dropout.set_state(dropout)
        self._order = order.clone()
        if state is None:
            self._optimizer = None
        else:
            if self._optimizer is None:
                self._optimizer = self.make_optimizer(self.model.parameters())
            self._optimizer.load_state_dict(copy.deepcopy(state))

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.layout)
        return evaluate_model(self.model, self.val_features, self.val_labels)

    def task(self) -> LocalTask:
        """This trainer's model, data and settings, for a trainer that wraps it."""
        return LocalTask(self.model, self.layout, self.features, self.labels,
                         self.val_features, self.val_labels, self.epochs, self.batch_size,
                         self.make_optimizer, self.generator, self.objective, self.device,
                         self.begin_round)


class RoundRewind:
    """Trainer wrapper: a round trained again starts from the same random state.

    When round ``t`` is asked for again (a server that resumed after a crash, or one that
    redoes a round that aborted before any reveal), the trainer restores its batch-shuffling
    generator, the rest of its current pass and a kept momentum buffer to where they stood
    before the lost attempt, so the redone round (and the final model) equals an
    uninterrupted run's.
    """

    def __init__(self, base: LocalTrainer) -> None:
        self.base = base
        self._before: tuple[int, Any] | None = None

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        if self._before is not None and self._before[0] == round:
            self.base.restore(self._before[1])
        else:
            self._before = (round, self.base.snapshot())
        return self.base.fit(parameters, round=round)

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return self.base.evaluate(parameters)
