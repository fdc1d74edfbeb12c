"""White-box gradient canaries for the one-run audit of sample-level DP-SGD.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023),
Sec. 6-7: ``m`` *Dirac canaries* ``g_j = G e_{c_j}`` (one flat model coordinate ``c_j`` each,
all distinct, picked among the coordinates the real task's gradients move least, so the task
does not drown them) are each included independently with probability 1/2.  An included canary is an
extra example of the client that owns it: at every DP-SGD step it is Poisson-sampled at the
rate of the loader the client really uses, and when sampled its gradient is appended to the
per-example gradients *before* the pipeline clips them, so it is clipped to ``C``, summed and
noised exactly like a real example.  ``G`` is well above ``C`` (``G = 10 C`` by default) so a
pipeline that does not clip shows it.  The score of canary ``j`` owned by client ``k`` is
client ``k``'s contribution to the final model's displacement against the canary gradient,
``-Σ_t Δ_k^t[c_j]`` over the updates ``Δ_k^t`` it released (a post-processing of exactly the
releases its accountant charges; the global model's displacement, which averages in every
other client's noise, would be a valid but weaker score, Sec. 7).  The bound is
:func:`securefl.privacy.audit.one_run_lower_bound` on those scores.  The canaries ride on the
real task's training run, so an audit costs about one run.

Adding or removing one canary changes one client's data by one example, so under the
accountant's (ε, δ) sample-level guarantee every canary is (ε, δ)-DP and the theorem applies.

The insertion is audit-only: :func:`install_canaries` wraps one trainer's optimizer instance
(Opacus's ``DPOptimizer.clip_and_accumulate``; a step pre-hook on the plain optimizer of a
non-private client); the library's DP path is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from securefl.config import Config
from securefl.engine.history import RoundRecord
from securefl.errors import ConfigError
from securefl.privacy.audit import AuditReport, one_run_lower_bound
from securefl.vector import Layout

__all__ = ["GradientCanaries", "draw_canaries", "install_canaries", "run_gradient_audit",
           "train_with_canaries"]

#: a planted fault for tests and benchmarks: called with (client id, trainer) before training
Tamper = Callable[[str, Any], None]


@dataclass(frozen=True)
class GradientCanaries:
    """Dirac canaries: flat coordinate, owning client (index) and inclusion of each."""

    coordinates: np.ndarray
    owners: np.ndarray
    included: np.ndarray
    norm: float


def draw_canaries(*, activity: np.ndarray, num_clients: int, num_canaries: int, norm: float,
                  rng: np.random.Generator) -> GradientCanaries:
    """The ``num_canaries`` coordinates of least ``activity`` (ties in random order), each
    owned by a uniformly chosen client and included with probability 1/2.

    The choice may depend on the non-canary data: the theorem conditions on it; only the
    inclusion bits must be independent fair coins."""
    size = len(activity)
    if not 2 <= num_canaries <= size:
        raise ValueError(f"num_canaries must be in [2, {size}] (one model coordinate each), "
                         f"got {num_canaries}")
    if not norm > 0 or num_clients < 1:
        raise ValueError(f"need norm > 0 and num_clients >= 1, got {norm}, {num_clients}")
    shuffled = rng.permutation(size)
    quiet = shuffled[np.argsort(np.asarray(activity)[shuffled], kind="stable")]
    coordinates = np.sort(quiet[:num_canaries]).astype(np.int64)
    owners = rng.integers(num_clients, size=num_canaries)
    included = rng.random(num_canaries) < 0.5
    return GradientCanaries(coordinates, owners, included, float(norm))


class _Injector:
    """Per step, samples each of one client's included canaries at rate ``q`` and builds the
    per-parameter rows ``G e_c`` of the sampled ones."""

    def __init__(self, layout: Layout, coordinates: np.ndarray, norm: float,
                 rng: np.random.Generator) -> None:
        self.coordinates, self.norm, self.rng = coordinates, norm, rng
        offsets = np.array([spec.offset for spec in layout.specs])
        self.param = np.searchsorted(offsets, coordinates, side="right") - 1
        self.within = coordinates - offsets[self.param]
        self.shapes = [spec.shape for spec in layout.specs]

    def rows(self, rate: float) -> list[torch.Tensor] | None:
        chosen = np.flatnonzero(self.rng.random(len(self.coordinates)) < rate)
        if chosen.size == 0:
            return None
        out = []
        for index, shape in enumerate(self.shapes):
            rows = torch.zeros((len(chosen), int(np.prod(shape, dtype=np.int64))))
            mine = np.flatnonzero(self.param[chosen] == index)
            rows[torch.as_tensor(mine), torch.as_tensor(self.within[chosen[mine]])] = self.norm
            out.append(rows.reshape(len(chosen), *shape))
        return out


def _dp_sgd_hook(trainer: Any, injector: _Injector) -> None:
    optimizer = trainer.optimizer
    if trainer.grad_sample_mode == "ghost":
        raise ConfigError("[privacy] grad_sample_mode = 'ghost' keeps no per-example "
                          "gradients; audit with 'hooks', 'functorch' or 'ew'")
    original = optimizer.clip_and_accumulate
    params = list(optimizer.params)

    def clip_and_accumulate() -> None:
        rate = float(getattr(trainer.loader.batch_sampler, "sample_rate", trainer.sample_rate))
        rows = injector.rows(rate)
        if rows is not None:
            for param, extra in zip(params, rows, strict=True):
                grad_sample = param.grad_sample
                if isinstance(grad_sample, list):
                    grad_sample = torch.cat(grad_sample)
                if grad_sample is None:
                    grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype)
                param.grad_sample = torch.cat([grad_sample, extra.to(grad_sample)])
        original()

    optimizer.clip_and_accumulate = clip_and_accumulate


def _plain_hook(trainer: Any, injector: _Injector) -> None:
    make = trainer.make_optimizer
    rate = min(1.0, trainer.batch_size / trainer.num_examples)

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        optimizer = make(params)
        owned = [p for group in optimizer.param_groups for p in group["params"]]

        def add_canaries(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            rows = injector.rows(rate)
            if rows is not None:  # the mean loss divides an example's gradient by B
                for param, extra in zip(owned, rows, strict=True):
                    param.grad.add_(extra.sum(dim=0) / trainer.batch_size)

        optimizer.register_step_pre_hook(add_canaries)
        return optimizer

    trainer.make_optimizer = make_optimizer


def install_canaries(trainer: Any, *, layout: Layout, coordinates: np.ndarray, norm: float,
                     rng: np.random.Generator) -> None:
    """Insert Dirac canaries ``norm * e_c`` (``c`` in ``coordinates``) into ``trainer``'s
    steps: into the per-example gradients before clipping for DP-SGD, into the mini-batch
    gradient for a non-private client."""
    from securefl.engine.trainer import LocalTrainer, RoundRewind
    from securefl.privacy.dp_sgd import DPSGDTrainer

    injector = _Injector(layout, coordinates, norm, rng)
    if isinstance(trainer, RoundRewind):  # a simulation's plain trainer, wrapped for redos
        trainer = trainer.base
    if isinstance(trainer, DPSGDTrainer):
        _dp_sgd_hook(trainer, injector)
    elif isinstance(trainer, LocalTrainer):
        _plain_hook(trainer, injector)
    else:
        raise ConfigError(f"[privacy] gradient canaries audit sample-level DP-SGD or a "
                          f"non-private run; {type(trainer).__name__} is neither (use "
                          f"--canary input)")


def gradient_activity(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                      *, batch_size: int = 8) -> np.ndarray:
    """``Σ_b |∇_θ loss(batch b)|`` over mini-batches of the training data at the initial
    model: how much the real task moves each coordinate (zero for a weight fed by an input
    that is always 0)."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for start in range(0, len(labels), batch_size):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(features[start:start + batch_size]),
                                          labels[start:start + batch_size]).backward()
        for acc, param in zip(total, model.parameters(), strict=True):
            if param.grad is not None:
                acc += param.grad.abs()
    model.zero_grad(set_to_none=True)
    return torch.cat([t.reshape(-1) for t in total]).numpy().astype(np.float64)


class _Scores:
    """Client-side update hook: adds ``-Δ[c]`` of the client's own canaries to its scores
    (the canaries are set once drawn, before the first round)."""

    def __init__(self) -> None:
        self.scores = np.zeros(0)
        self.mine = np.zeros(0, dtype=bool)
        self.coordinates = np.zeros(0, dtype=np.int64)

    def __call__(self, update: Any) -> Any:
        self.scores[self.mine] -= np.asarray(update.delta, dtype=np.float64)[self.coordinates]
        return update


@dataclass(frozen=True)
class CanaryRun:
    """Scores (``-Σ_t Δ_k^t[c_j]``, owner ``k``) of one audited training run."""

    scores: np.ndarray
    canaries: GradientCanaries
    accountant_epsilon: float
    parameters: np.ndarray


def train_with_canaries(config: Config, *, num_canaries: int, norm_factor: float = 10.0,
                        tamper: Tamper | None = None,
                        on_round: Callable[[RoundRecord], None] | None = None) -> CanaryRun:
    """Train ``config`` once with Dirac canaries of norm ``norm_factor * C`` (``C`` =
    ``[privacy] max_grad_norm``; 1 when non-private) and score them.

    ``tamper`` plants a fault in each built trainer (tests and benchmarks only);
    ``on_round`` is called after each round (progress).  The audit trains on the CPU whatever
    ``[run] device`` says (its canaries are CPU tensors)."""
    from securefl.data import federate
    from securefl.engine.trainer import torch_threads
    from securefl.models import build_model
    from securefl.simulation import build_simulation
    from securefl.vector import unflatten

    config = config.replace(run__device="cpu")
    if config.privacy.mode not in ("none", "dp_sgd"):
        raise ConfigError(f"[privacy] gradient canaries audit sample-level DP-SGD or a "
                          f"non-private run, not mode = {config.privacy.mode!r} "
                          f"(use --canary input)")
    data = federate(config.data, seed=config.run.seed)
    ids = list(data.clients)
    hooks = {cid: _Scores() for cid in ids}
    simulation = build_simulation(config, data=data,
                                  client_hooks={cid: [hook] for cid, hook in hooks.items()})
    model = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed)
    unflatten(model, simulation.server.parameters)
    with torch_threads(config.simulation.torch_threads()):
        activity = gradient_activity(
            model,
            torch.from_numpy(np.concatenate([c.train.features for c in data.clients.values()])),
            torch.from_numpy(np.concatenate([c.train.labels for c in data.clients.values()])))
    clip = config.privacy.max_grad_norm if config.privacy.mode == "dp_sgd" else 1.0
    canaries = draw_canaries(activity=activity, num_clients=len(ids), num_canaries=num_canaries,
                             norm=norm_factor * clip,
                             rng=np.random.default_rng([config.run.seed, 0xA0D2]))
    scores = np.zeros(num_canaries)
    for index, hook in enumerate(hooks.values()):
        hook.scores, hook.mine = scores, canaries.owners == index
        hook.coordinates = canaries.coordinates[hook.mine]
    for index, cid in enumerate(ids):
        trainer = simulation.trainers[cid]
        if tamper is not None:
            tamper(cid, trainer)
        mine = canaries.included & (canaries.owners == index)
        install_canaries(trainer, layout=Layout.of(model),
                         coordinates=canaries.coordinates[mine], norm=canaries.norm,
                         rng=np.random.default_rng([config.run.seed, 0xA0D3, index]))
    try:
        with torch_threads(config.simulation.torch_threads()):
            simulation.server.run(config.run.rounds, on_round=on_round)
    finally:
        simulation.transport.close()
    privacy = simulation.privacy
    spent = math.inf if privacy is None else privacy.largest_epsilon()
    return CanaryRun(scores, canaries, spent, simulation.server.parameters.copy())


def run_gradient_audit(config: Config, *, num_canaries: int = 1000, confidence: float = 0.95,
                       norm_factor: float = 10.0, tamper: Tamper | None = None,
                       on_round: Callable[[RoundRecord], None] | None = None
                       ) -> tuple[AuditReport, np.ndarray, np.ndarray]:
    """:func:`train_with_canaries`, bounded by
    :func:`~securefl.privacy.audit.one_run_lower_bound`; the report, scores and inclusion."""
    from securefl.attacks.membership import model_outputs
    from securefl.data import federate
    from securefl.models import build_model
    from securefl.vector import unflatten

    run = train_with_canaries(config, num_canaries=num_canaries, norm_factor=norm_factor,
                              tamper=tamper, on_round=on_round)
    included = run.canaries.included
    delta = config.privacy.delta
    bound = one_run_lower_bound(run.scores, included, delta=delta, confidence=confidence)
    data = federate(config.data, seed=config.run.seed)
    model = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed)
    unflatten(model, run.parameters)
    logits = model_outputs(model, data.test.features)
    accuracy = float((logits.argmax(axis=1) == data.test.labels).mean())
    report = AuditReport(bound.epsilon, run.accountant_epsilon, delta, confidence, bound.method,
                         num_canaries, int(included.sum()), bound.num_guesses,
                         bound.num_correct, accuracy, canary="gradient")
    return report, run.scores, included
