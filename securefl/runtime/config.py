"""``[network]``: the gRPC runtime (addresses, TLS material, deadlines)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NetworkConfig"]


@dataclass(frozen=True)
class NetworkConfig:
    address: str = "127.0.0.1:50051"
    insecure: bool = False
