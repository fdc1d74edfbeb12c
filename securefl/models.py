"""Small reference models: logistic regression, MLP and a CNN for 8x8 to 32x32 images.

All layers are Opacus-compatible (no BatchNorm).  Parameters are initialised from an
explicit ``torch.Generator`` (PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
scheme), never from the global RNG, so the same seed gives the same model everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from securefl.config import ModelConfig
from securefl.errors import ConfigError

__all__ = ["CNN", "MLP", "build_model", "logistic"]


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


def build_model(config: ModelConfig, in_shape: Sequence[int], num_classes: int, *,
                seed: int) -> nn.Module:
    """Build the configured model for inputs of shape ``in_shape`` (without the batch axis)."""
    in_features = math.prod(in_shape)
    if config.name == "logistic":
        model = logistic(in_features, num_classes)
    elif config.name == "mlp":
        model = MLP(in_features, num_classes, config.hidden)
    else:
        if len(in_shape) != 3 or min(in_shape[1:]) < 4:
            raise ConfigError(f"[model] name = \"cnn\" needs image inputs (channels, height "
                              f">= 4, width >= 4), but the data's examples have shape "
                              f"{tuple(in_shape)}; use \"mlp\" or \"logistic\"")
        model = CNN(in_shape[0], num_classes)
    initialise(model, torch.Generator().manual_seed(seed))
    return model


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
