"""Homomorphic aggregation with CKKS (TenSEAL's SEAL bindings).

The server only ever holds a public context::

    keys = CKKSKeys.generate()        # on a key holder: a designated client, or the simulation
    keys.public().is_private()        # False: parameters and key id, no key at all

Clients encrypt ``w_i x_i`` with seeded symmetric CKKS (half a ciphertext on the wire, two
reals per complex slot), the server adds ciphertexts, and designated clients decrypt the sum.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from securefl.he.config import HEConfig
from securefl.he.params import MAX_COEFF_MODULUS_BITS, CKKSParameters

if TYPE_CHECKING:
    from securefl.he.ckks import CKKSKeys
    from securefl.he.packing import Selection
    from securefl.he.protection import HEClientProtection, HEServerProtection

# TenSEAL loads on first use, so reading a config does not import it.
_LAZY = {"CKKSKeys": "securefl.he.ckks", "Selection": "securefl.he.packing",
         "HEClientProtection": "securefl.he.protection",
         "HEServerProtection": "securefl.he.protection"}

__all__ = [
    "MAX_COEFF_MODULUS_BITS",
    "CKKSKeys",
    "CKKSParameters",
    "HEClientProtection",
    "HEConfig",
    "HEServerProtection",
    "Selection",
    "build_simulation",
    "layer_selection",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_simulation(config: HEConfig, client_ids: Sequence[str], *, layout: object = None
                     ) -> tuple[HEServerProtection, dict[str, HEClientProtection]]:
    """Generate keys as the key holder and hand out the halves of an HE federation.

    The server half is built from the *serialized public* context, so it provably never
    sees the secret key; each client gets its own copy of the secret context and an Ed25519
    signing key whose public half the server uses to verify uploads.  ``layout`` (a
    :class:`securefl.params.Layout`) is required when ``config.layers`` selects layers.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefl.he.ckks import CKKSKeys
    from securefl.he.protection import HEClientProtection, HEServerProtection

    keys = CKKSKeys.generate(poly_modulus_degree=config.poly_modulus_degree,
                             coeff_modulus_bits=config.coeff_modulus_bits,
                             scale_bits=config.scale_bits)
    selection = layer_selection(config, layout)
    secret = keys.to_bytes()
    signing = {cid: Ed25519PrivateKey.generate() for cid in client_ids}
    server = HEServerProtection.from_bytes(
        keys.public().to_bytes(),
        verify_keys={cid: key.public_key() for cid, key in signing.items()},
        decryptors=config.decryptors, min_contributors=config.min_contributors,
        selection=selection)
    clients = {cid: HEClientProtection.from_bytes(
        secret, client_id=cid, signing_key=signing[cid],
        min_contributors=config.min_contributors, selection=selection)
        for cid in client_ids}
    return server, clients


def layer_selection(config: HEConfig, layout: object = None) -> Selection | None:
    """The coordinates to encrypt: ``None`` (all of them) unless ``config.layers`` selects
    layers of ``layout`` (a :class:`securefl.params.Layout`); a pattern that matches no
    parameter raises ``ValueError``."""
    if not config.layers:
        return None
    if layout is None:
        raise ValueError("[protection.he] layers needs the model layout to select "
                         "parameters by name")
    from securefl.he.packing import Selection

    return Selection.of_layers(layout, config.layers)  # type: ignore[arg-type]
