"""``[run] device``: where local training runs (``"cpu"``, the default; ``"cuda"``; ``"auto"``).

``"cuda"`` asks for the first CUDA device and is a configuration error where torch finds
none, so a site that meant to use its GPU never silently trains on the CPU; ``"auto"`` takes
the GPU when torch finds one and the CPU otherwise.  Only what runs per batch moves: a
trainer's model and its training and validation tensors (plain SGD and Opacus DP-SGD alike).
The engine's interface stays on the CPU: updates leave a trainer as float32 numpy vectors
(:func:`securefl.vector.flatten` copies them back), so masking, encryption, aggregation and
the server's central evaluation are the same on every machine.  A GPU does not reproduce the
CPU's floating-point results bit for bit; a run is reproducible on the same device.
"""

from __future__ import annotations

import torch

from securefl.errors import ConfigError

__all__ = ["DEVICES", "select_device"]

DEVICES = ("cpu", "cuda", "auto")


def select_device(setting: str) -> torch.device:
    """The :class:`torch.device` for ``[run] device = setting``."""
    if setting not in DEVICES:
        raise ConfigError(f"[run] device must be one of {', '.join(DEVICES)}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if setting == "cuda" and not available:
        raise ConfigError("[run] device = \"cuda\", but torch finds no CUDA device "
                          "(torch.cuda.is_available() is false); use \"cpu\" or \"auto\"")
    return torch.device("cuda" if available else "cpu")
