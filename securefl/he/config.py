"""``[protection.he]``: CKKS homomorphic encryption parameters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEConfig"]


@dataclass(frozen=True)
class HEConfig:
    poly_modulus_degree: int = 8192
