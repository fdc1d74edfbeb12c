"""A site's own loss and training step (``securefl.own.run(loss=..., step=...)``, or
``[client] loss`` / ``[client] step = "package.module:function"``).

* ``loss(outputs, labels) -> scalar tensor``: by default
  :func:`torch.nn.functional.cross_entropy` over the model's logits.
* ``step(model, features, labels, loss) -> scalar tensor``: the loss of one batch, by default
  ``loss(model(features), labels)``.  A step computes the loss only (e.g. several forward
  passes, an auxiliary term per example, an input transform); the engine then runs
  ``backward()`` and the optimizer step, so under DP-SGD Opacus's per-example clipping and
  noise are never bypassed.

The contract (it is what DP-SGD needs, Abadi et al., CCS 2016, and what Opacus computes
per-example gradients of): the scalar is the **mean** over the batch of per-example losses,
``(1/B) sum_i l(x_i, y_i)``, where ``l(x_i, y_i)`` depends on example ``i`` alone, or their
**sum** when the loss says so with ``loss.reduction = "sum"`` (as
``torch.nn.CrossEntropyLoss(reduction="sum")`` does); Opacus is told which
(``loss_reduction``).  A term that couples examples (a batch statistic, mixing two examples)
would let one example's gradient carry another's, which per-example clipping cannot bound.
Under DP-SGD the trainer checks the contract on two of the site's examples before training:
the pair's loss must equal the mean (or the sum) of the two single-example losses.  Opacus's
``grad_sample_mode = "ghost"`` wraps the loss itself and takes the built-in loss and step
only.

Model outputs are still read as logits by evaluation (accuracy is their argmax; the loss
reported by evaluation is cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from securefl.config import Config
from securefl.errors import ConfigError

__all__ = ["Loss", "Objective", "Step", "check_per_example", "forward", "objective",
           "reduction", "reference", "scalar"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, Loss], torch.Tensor]
#: ``[client] loss = "python:<name>"`` records a loss given as a Python object
PYTHON = "python:"


def forward(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
            loss: Loss) -> torch.Tensor:
    """The built-in step: ``loss(model(features), labels)``."""
    return loss(model(features), labels)


@dataclass(frozen=True)
class Objective:
    """What a trainer minimises: ``loss`` and ``step`` (the built-ins unless ``custom``)."""

    loss: Loss = nn.functional.cross_entropy
    step: Step = forward
    custom: bool = field(default=False)


def reduction(loss: Loss) -> str:
    """``"mean"`` (the default) or ``"sum"``, from the loss's ``reduction`` attribute."""
    value = getattr(loss, "reduction", "mean")
    if value not in ("mean", "sum"):
        raise ConfigError(f"the loss has reduction = {value!r}; it must return one scalar, "
                          "the mean (reduction = \"mean\") or the sum (\"sum\") of per-example "
                          "losses")
    return str(value)


def reference(obj: object) -> str:
    """How the run directory records a loss or step given as a Python object."""
    return f"{PYTHON}{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _resolve(spec: str | None, given: object | None, config: Config, field_name: str
             ) -> object | None:
    if given is not None:
        return given
    if spec is None:
        return None
    if spec.startswith(PYTHON):
        raise ConfigError(f"[client] {field_name} = {spec!r} records a {field_name} given as a "
                          f"Python object; pass it again with securefl.own.run(..., "
                          f"{field_name}=...)")
    from securefl.models import import_callable

    return import_callable(spec, config.model.path, field=f"[client] {field_name}")


def objective(config: Config, *, loss: Loss | None = None,
              step: Step | None = None) -> Objective:
    """The objective of ``config`` (``[client] loss`` and ``step`` by reference), with
    ``loss`` and ``step`` (Python objects) taking precedence."""
    own_loss = _resolve(config.client.loss, loss, config, "loss")
    own_step = _resolve(config.client.step, step, config, "step")
    if own_loss is None and own_step is None:
        return Objective()
    chosen = Objective(loss=own_loss or nn.functional.cross_entropy,  # type: ignore[arg-type]
                       step=own_step or forward, custom=True)  # type: ignore[arg-type]
    reduction(chosen.loss)
    return chosen


def scalar(value: object, *, where: str = "the training step") -> torch.Tensor:
    """``value`` if it is a 0-dimensional floating-point tensor; else a one-line TypeError."""
    if not (isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point()):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{where} must return the batch's loss as a scalar tensor, got {shape}")
    return value


def check_per_example(chosen: Objective, model: nn.Module, features: torch.Tensor,
                      labels: torch.Tensor) -> None:
    """Check the contract on the first two examples: ``l(pair) == mean (or sum) of
    l(single)``, within float32 tolerance; ConfigError naming the numbers otherwise."""
    if len(labels) < 2:
        return
    how = reduction(chosen.loss)
    was_training = model.training
    model.eval()  # dropout would make the two evaluations differ for no fault of the loss
    try:
        with torch.no_grad():
            pair = float(scalar(chosen.step(model, features[:2], labels[:2], chosen.loss)))
            single = [float(scalar(chosen.step(model, features[i:i + 1], labels[i:i + 1],
                                                chosen.loss))) for i in range(2)]
    finally:
        model.train(was_training)
    expected = sum(single) / (2 if how == "mean" else 1)
    if not abs(pair - expected) <= 1e-4 * max(1.0, abs(expected)):  # NaN fails too
        raise ConfigError(
            f"[privacy] DP-SGD needs a loss that is the {how} of per-example losses: on two "
            f"examples it gave {pair:.6g}, but their single losses {single[0]:.6g} and "
            f"{single[1]:.6g} have {how} {expected:.6g} (a term coupling examples, or a "
            f"reduction other than loss.reduction = {how!r})")
