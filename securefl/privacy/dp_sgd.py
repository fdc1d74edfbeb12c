"""Sample-level DP-SGD on a client through Opacus's :class:`~opacus.PrivacyEngine`.

DP-SGD (Abadi et al., CCS 2016): each step draws a Poisson sample of the client's examples at
rate ``q``, clips every per-example gradient to L2 norm ``max_grad_norm`` = C, sums them, adds
``N(0, (sigma C)^2)`` to each coordinate and divides by the expected batch size ``q N``.  One
round of ``epochs`` local epochs is ``steps = epochs / q`` such steps: the event
``(sigma, q, steps)`` that the client's ledger charges before it trains.

The engine is built once per client and reused every round, so Opacus's own accountant keeps
the whole history (re-creating it per round would forget earlier rounds) and the model is
wrapped once (wrapping twice would register the per-sample hooks twice).  A model is refused if
it was already handed to Opacus.

Randomness (``secure_mode``): with ``True`` the Poisson sample and the noise come from
:mod:`securefl.privacy.randomness` (AES-CTR under fresh ``os.urandom`` keys; Holohan and
Braghin's summed Gaussians against the floating-point attack), so a server holding the shared
config cannot replay them.  With ``False`` both come from the trainer's generator, seeded from
``[run] seed`` and the client's index: reproducible, for simulations, and predictable by
anyone holding the config.  Every request is answered through
:class:`~securefl.privacy.release.Releases`: one charge per release, repeats from memory.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, cast

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from securefl.engine.protection import Update
from securefl.engine.trainer import LocalTask, evaluate_model
from securefl.errors import ConfigError
from securefl.objective import check_per_example, reduction, scalar
from securefl.privacy.accounting import PrivacyEvent
from securefl.privacy.ledger import PrivacyLedger
from securefl.privacy.randomness import SecurePoissonSampler, SecureRandom, use_secure_noise
from securefl.privacy.release import Releases
from securefl.vector import Layout, flatten, unflatten

__all__ = ["GRAD_SAMPLE_MODES", "DPSGDTrainer", "batches_per_epoch", "make_compatible"]

_log = logging.getLogger(__name__)
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
_WRAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps per epoch of Opacus's Poisson loader for ``num_examples`` at ``batch_size``:
    ``int(1 / q0)`` with ``q0 = 1 / ceil(N / B)``.  The accountant's rate is ``1 / steps``."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, "
                         f"got {num_examples} and {batch_size}")
    return int(1 / (1 / -(-num_examples // batch_size)))


def make_compatible(model: nn.Module, *, fix: bool) -> nn.Module:
    """Check ``model`` with Opacus's ``ModuleValidator``; with ``fix``, return the fixed copy
    (BatchNorm -> GroupNorm and the like) when its parameter layout is unchanged."""
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    problems = "; ".join(str(e) for e in errors)
    if not fix:
        raise ConfigError(
            f"[privacy] the model has layers DP-SGD cannot train with per-example gradients "
            f"({problems}); set [privacy] fix_model = true to let Opacus replace them "
            f"(BatchNorm -> GroupNorm), or use a model without them")
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ConfigError(f"[privacy] Opacus cannot fix the model: "
                          f"{'; '.join(str(e) for e in remaining)}")
    if Layout.of(fixed) != Layout.of(model):
        raise ConfigError("[privacy] fixing the model for DP-SGD changed its parameters; "
                          "build the model with GroupNorm instead of BatchNorm")
    _log.warning("model fixed for DP-SGD: %s", problems)
    return fixed


class DPSGDTrainer:
    """A :class:`~securefl.engine.trainer.LocalTrainer` whose rounds run Opacus DP-SGD.

    ``fit`` charges ``PrivacyEvent("dp_sgd", sigma, q, epochs * batches)`` to ``ledger`` for
    the release (raising :class:`~securefl.errors.BudgetExceeded` before any training when the
    budget would be exceeded), then trains from the global vector and returns
    ``Update(local - global, num_examples)``.  ``secure_mode``: CSPRNG sampling and noise
    (the module docstring).
    """

    def __init__(self, task: LocalTask, *, client_id: str, ledger: PrivacyLedger,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str = "hooks",
                 secure_mode: bool = False, accountant: str = "rdp",
                 fix_model: bool = False) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                             f"got {grad_sample_mode!r}")
        if task.model in _WRAPPED:
            raise ValueError(f"the model of {client_id!r} is already wrapped for DP-SGD; wrap "
                             f"each client once and reuse the trainer across rounds")
        model = make_compatible(task.model, fix=fix_model)
        chosen = task.objective
        if chosen.custom:
            if grad_sample_mode == "ghost":
                raise ConfigError("[privacy] grad_sample_mode = \"ghost\" wraps Opacus's own "
                                  "loss; a custom loss or step needs \"hooks\" (or "
                                  "\"functorch\")")
            check_per_example(chosen, model, task.features, task.labels)
        self.task, self.model, self.client_id, self.ledger = task, model, client_id, ledger
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.grad_sample_mode = grad_sample_mode
        self.secure_mode = secure_mode
        with warnings.catch_warnings():
            # Opacus's own secure mode needs torchcsprng; ours does not use it
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=accountant, secure_mode=False)
        examples = _Examples(task.features, task.labels)
        seeded = DPDataLoader.from_data_loader(
            DataLoader(examples, batch_size=task.batch_size, collate_fn=_as_batch),
            generator=task.generator)
        source = SecureRandom()
        loader = seeded if not secure_mode else DataLoader(
            examples, collate_fn=_as_batch, batch_sampler=SecurePoissonSampler(
                num_samples=len(examples), sample_rate=seeded.sample_rate,
                steps=len(seeded), source=source))
        made = self.engine.make_private(
            module=model, optimizer=task.make_optimizer(model.parameters()),
            # a fresh CrossEntropyLoss by default: ghost clipping rewrites its reduction
            criterion=chosen.loss if chosen.custom else nn.CrossEntropyLoss(),
            loss_reduction=reduction(chosen.loss), data_loader=loader,
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples, with our generator
            noise_generator=_noise_generator(task), grad_sample_mode=grad_sample_mode)
        _WRAPPED.add(task.model)
        _WRAPPED.add(model)
        if grad_sample_mode == "ghost":
            self.module, self.optimizer, self.criterion, self.loader = made
        else:
            self.module, self.optimizer, self.loader = made
            self.criterion = chosen.loss
        self.step, self.custom = chosen.step, chosen.custom
        if secure_mode:
            use_secure_noise(self.optimizer, source)
        self.module.forbid_grad_accumulation()
        self.steps_per_epoch = len(self.loader)
        self.sample_rate = 1 / self.steps_per_epoch
        self.releases = Releases(ledger, client_id)

    @property
    def layout(self) -> Layout:
        return self.task.layout

    @property
    def num_examples(self) -> int:
        return len(self.task.labels)

    def round_event(self) -> PrivacyEvent:
        """The event one round charges: ``(sigma, q, epochs * steps per epoch)``."""
        return PrivacyEvent("dp_sgd", self.noise_multiplier, self.sample_rate,
                            self.task.epochs * self.steps_per_epoch)

    def opacus_epsilon(self, delta: float) -> float:
        """Epsilon by the Opacus engine's own accountant (a cross-check of the ledger)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(self.engine.accountant.get_epsilon(delta=delta))

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        release, answer = self.releases.recall(parameters, round=round)
        if answer is not None:
            return answer
        spent = self.ledger.charge(self.client_id, self.round_event(), round=round,
                                   release=release)
        task = self.task
        task.begin_round(round)
        unflatten(self.model, parameters, task.layout)
        self.optimizer.original_optimizer.state.clear()  # a round starts a fresh optimizer
        self.module.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(task.epochs):
                for features, labels in self.loader:
                    # Opacus makes an empty Poisson batch on the CPU, whatever the device
                    features, labels = features.to(task.device), labels.to(task.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.step(self.module, features, labels, self.criterion)
                    # ghost clipping's loss is Opacus's own wrapper, not a plain tensor
                    (scalar(loss) if self.custom else loss).backward()
                    # noise is added, and the step accounted, on an empty Poisson batch too
                    self.optimizer.step()
        delta = (flatten(self.model) - parameters).astype(np.float32)
        # only public quantities leave the client: a training loss is computed from its data
        # without noise, so it is not reported
        metrics = {"epsilon": spent, "delta": self.ledger.delta,
                   "noise_multiplier": self.noise_multiplier}
        return self.releases.keep(release, round=round,
                                  update=Update(delta, float(self.num_examples)),
                                  metrics=metrics)

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.task.layout)
        return evaluate_model(self.model, self.task.val_features, self.task.val_labels)


def _noise_generator(task: LocalTask) -> torch.Generator:
    """The seeded noise generator (``secure_mode = false``): the task's own on the CPU; on a
    GPU, where torch draws from a generator of that device, one seeded alike."""
    if task.device.type == "cpu":
        return task.generator
    return torch.Generator(device=task.device).manual_seed(task.generator.initial_seed())


class _Examples(TensorDataset):
    """Fetches a whole Poisson batch with one indexing operation instead of per example."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index.to(tensor.device)] for tensor in self.tensors)


def _as_batch(batch: Any) -> tuple[torch.Tensor, ...]:
    return cast(tuple[torch.Tensor, ...], batch)
