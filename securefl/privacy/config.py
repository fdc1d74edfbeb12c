"""``[privacy]``: differential privacy settings (sample-level DP-SGD or user-level DP-FedAvg)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PrivacyConfig"]


@dataclass(frozen=True)
class PrivacyConfig:
    mode: Literal["none", "dp_sgd", "dp_fedavg"] = "none"
