"""Small reference models (logistic regression, MLP, a CNN for 8x8 to 32x32 images, the
MNIST network of Karimireddy et al. 2022 with or without its dropout) and a site's own model
(``[model] factory`` or a Python object, see :func:`own_model`).

All layers are Opacus-compatible (no BatchNorm).  Parameters are initialised from an
explicit ``torch.Generator`` (PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
scheme), never from the global RNG, so the same seed gives the same model everywhere.
Dropout masks (:class:`SeededDropout`) come from an explicit generator too, which the site's
trainer replaces by its own (:func:`seed_dropout`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

from securefl.config import ModelConfig
from securefl.errors import ConfigError

__all__ = ["CNN", "MLP", "MnistNet", "OwnModel", "SeededDropout", "build_model",
           "import_callable", "import_factory", "logistic", "own_model", "seed_dropout"]

#: what a user brings: a module (copied for every party) or a factory that returns one
OwnModel = nn.Module | Callable[..., nn.Module]


def logistic(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: ``softmax(W x + b)``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class MLP(nn.Sequential):
    """``Linear -> ReLU`` blocks of the given widths, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks, adaptive pooling to 2x2, linear head.

    Works for any input of at least 4x4 pixels (digits 8x8, MNIST 28x28, CIFAR 32x32).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeededDropout(nn.Module):
    """Inverted dropout with masks drawn from ``generator``, never from torch's global RNG.

    In training mode ``y = x * m / (1 - p)`` with ``m_j ~ Bernoulli(1 - p)`` independently;
    ``channels``: one ``m`` per example and channel, shared by all its positions (dropping
    whole feature maps, as ``nn.Dropout2d``), otherwise one per element (``nn.Dropout``).
    In eval mode the identity.  The masks are drawn on the CPU (the generator's device) and
    moved to the input's device, so a run draws the same masks on any device.
    """

    def __init__(self, p: float, *, channels: bool, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.channels, self.generator = p, channels, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if self.channels else tuple(x.shape)
        keep = 1.0 - self.p
        mask = (torch.rand(shape, generator=self.generator) < keep).to(x.dtype) / keep
        return x * mask.to(x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}, channels={self.channels}"


def seed_dropout(model: nn.Module, generator: torch.Generator) -> int:
    """Let every :class:`SeededDropout` of ``model`` draw its masks from ``generator`` (the
    site's trainer owns it, seeded from the site's seed); returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, SeededDropout)]
    for layer in layers:
        layer.generator = generator
    return len(layers)


class MnistNet(nn.Module):
    """The MNIST network of the PyTorch examples, as in Karimireddy, He & Jaggi's code (ICLR
    2022): ``Conv(1->32, 3x3) -> ReLU -> Conv(32->64, 3x3) -> ReLU -> MaxPool(2) ->
    Linear(9216->128) -> ReLU -> Linear(128->10)`` on 28x28 inputs, 1.2 M parameters.  The
    inputs are first normalised as their MNIST transform does, ``(x - 0.1307) / 0.3081``.

    ``variant = "karimireddy2022"`` is exactly their ``Net`` (``codes/tasks/mnist.py``): no
    ReLU after the second convolution, ``Dropout2d(0.25)`` after the pooling (whole channels
    per example) and dropout 0.5 on the hidden units (single units: their ``Dropout2d`` on a
    2-D input, in the torch of 2021).  ``variant = "plain"`` (the default) has the ReLU and
    no dropout.  The masks come from ``generator`` (:class:`SeededDropout`).
    """

    MEAN, STD = 0.1307, 0.3081
    VARIANTS = ("plain", "karimireddy2022")

    def __init__(self, in_channels: int, num_classes: int, *, variant: str = "plain",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        theirs = variant == "karimireddy2022"
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3),
            *([] if theirs else [nn.ReLU()]), nn.MaxPool2d(2),
            *([SeededDropout(0.25, channels=True, generator=gen)] if theirs else []),
            nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(9216, 128), nn.ReLU(),
            *([SeededDropout(0.5, channels=False, generator=gen)] if theirs else []),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.MEAN) / self.STD))


def build_model(config: ModelConfig, in_shape: Sequence[int], num_classes: int, *,
                seed: int, own: OwnModel | None = None) -> nn.Module:
    """Build the configured model for inputs of shape ``in_shape`` (without the batch axis);
    ``own`` (or ``[model] factory``) is the site's own model, see :func:`own_model`."""
    if own is not None or config.name in ("factory", "python"):
        if own is None and config.name == "python":
            raise ConfigError("[model] name = \"python\" records a model given as a Python "
                              "object; pass it again with securefl.own.run(..., model=...)")
        return own_model(own if own is not None else import_factory(config), in_shape,
                         num_classes, seed=seed)
    # the layers' own default initialisation draws from torch's global RNG before
    # ``initialise`` redraws every parameter from the seeded generator: its state is restored
    with torch.random.fork_rng(devices=[]):
        model = _layers(config, in_shape, num_classes, seed=seed)
    initialise(model, torch.Generator().manual_seed(seed))
    return model


def _layers(config: ModelConfig, in_shape: Sequence[int], num_classes: int, *,
            seed: int) -> nn.Module:
    """The configured built-in model's layers, not yet initialised by :func:`initialise`."""
    in_features = math.prod(in_shape)
    if config.name == "logistic":
        return logistic(in_features, num_classes)
    if config.name == "mlp":
        return MLP(in_features, num_classes, config.hidden)
    if config.name == "mnist_cnn":
        if tuple(in_shape[1:]) != (28, 28):
            raise ConfigError(f"[model] name = \"mnist_cnn\" is the 28x28 MNIST network, but "
                              f"the data's examples have shape {tuple(in_shape)}; use \"cnn\"")
        return MnistNet(in_shape[0], num_classes, variant=config.variant,
                        generator=torch.Generator().manual_seed(seed + 1))
    if len(in_shape) != 3 or min(in_shape[1:]) < 4:
        raise ConfigError(f"[model] name = \"cnn\" needs image inputs (channels, height "
                          f">= 4, width >= 4), but the data's examples have shape "
                          f"{tuple(in_shape)}; use \"mlp\" or \"logistic\"")
    return CNN(in_shape[0], num_classes)


def initialise(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every Linear/Conv parameter as ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                for param in (module.weight, module.bias):
                    if param is not None:
                        param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)


def import_factory(config: ModelConfig) -> Callable[..., nn.Module]:
    """Resolve ``[model] factory = "package.module:function"`` like any import, with
    ``[model] path`` (the config file's folder) searched first."""
    factory = import_callable(str(config.factory), config.path, field="[model] factory")
    return cast(Callable[..., nn.Module], factory)  # own_model checks what it returns


def import_callable(spec: str, path: str | None, *, field: str) -> Callable[..., object]:
    """Resolve ``"package.module:function"`` (the ``field`` of a config) like any import,
    with the folder ``path`` searched first."""
    module_name, _, attr = spec.partition(":")
    added = path is not None and path not in sys.path
    if added:
        sys.path.insert(0, str(path))
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field} {spec!r}: cannot import {module_name!r} ({exc}; "
                          f"searched {path} first)") from None
    finally:
        if added:
            sys.path.remove(str(path))
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{field} {spec!r}: {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{field} {spec!r} is not callable")
    return target


def own_model(own: OwnModel, in_shape: Sequence[int], num_classes: int, *,
              seed: int) -> nn.Module:
    """A site's own model, checked: a module is deep-copied (every party starts from its
    weights); a factory is called as ``factory()`` or ``factory(in_shape, num_classes)``
    with torch's RNG forked and seeded from ``seed`` (the caller's RNG is left untouched,
    and every party builds the same initial weights).  Float64 parameters become float32.
    The model must map a batch of ``in_shape`` inputs to ``(batch, num_classes)`` logits."""
    name = getattr(own, "__qualname__", type(own).__qualname__)
    if isinstance(own, nn.Module):
        model = copy.deepcopy(own)
    elif callable(own):
        required = [p for p in inspect.signature(own).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = own(tuple(in_shape), num_classes) if required else own()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {name} returned {type(model).__name__}, "
                              "not a torch.nn.Module")
    else:
        raise ConfigError(f"a model must be a torch.nn.Module or a factory, got "
                          f"{type(own).__name__}")
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"model {name} has no parameters to train")
    model = model.float()
    with torch.no_grad():
        try:
            out = model.eval()(torch.zeros((2, *in_shape)))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError(f"model {name} does not accept inputs of shape "
                              f"{tuple(in_shape)}: {str(exc).splitlines()[0]}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"model {name} returns shape {tuple(out.shape[1:])} per example, but "
                          f"the data has {num_classes} classes (logits of shape "
                          f"({num_classes},) needed)")
    return model.train()
