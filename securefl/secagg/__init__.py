"""Secure aggregation: SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020).

Primitives: :mod:`~securefl.secagg.prg` (HKDF + AES-CTR), :mod:`~securefl.secagg.shamir`,
:mod:`~securefl.secagg.keys` (Ed25519, X25519, AES-GCM), :mod:`~securefl.secagg.quantize`,
:mod:`~securefl.secagg.graph`.  Protocol: :mod:`~securefl.secagg.client` and
:mod:`~securefl.secagg.server` (pure state machines), wired to the engine by
:mod:`~securefl.secagg.protection`.
"""

from securefl.config.secagg import SecAggConfig
from securefl.secagg.protection import (
    SecAggClientProtection,
    SecAggServerProtection,
    build_simulation,
)

__all__ = [
    "SecAggClientProtection",
    "SecAggConfig",
    "SecAggServerProtection",
    "build_simulation",
]
