"""``[protection.secagg]``: secure aggregation parameters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SecAggConfig"]


@dataclass(frozen=True)
class SecAggConfig:
    clip: float = 1.0
