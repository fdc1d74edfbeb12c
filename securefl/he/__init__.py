"""Homomorphic aggregation with CKKS (TenSEAL's SEAL bindings), with a blind server.

The server only ever holds a public context::

    keys = CKKSKeys.generate()        # on a key holder: fresh for every federation run
    keys.public().is_private()        # False: parameters and key id, no key at all

Sites encrypt ``(w_i / u)(x + lr delta_i)`` with seeded symmetric CKKS (half a ciphertext
on the wire, two reals per complex slot), the server adds ciphertexts and keeps the sum as
the encrypted global model, and every site decrypts it *itself* with the next ``FitIns``:
the server never receives a decryption (docs/homomorphic-encryption.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from securefl.config.ckks import MAX_COEFF_MODULUS_BITS, CKKSParameters
from securefl.config.he import HEConfig

if TYPE_CHECKING:
    from securefl.he.ckks import CKKSKeys
    from securefl.he.packing import Selection
    from securefl.he.protection import HEClientProtection
    from securefl.he.server import HEServerProtection

# TenSEAL loads on first use, so reading a config does not import it.
_LAZY = {"CKKSKeys": "securefl.he.ckks", "Selection": "securefl.he.packing",
         "HEClientProtection": "securefl.he.protection",
         "HEServerProtection": "securefl.he.server"}

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
    "site_view",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_simulation(config: HEConfig, client_ids: Sequence[str], *, layout: object = None,
                     dimension: int | None = None, server_lr: float = 1.0
                     ) -> tuple[HEServerProtection, dict[str, HEClientProtection]]:
    """Generate fresh keys as the key holder and hand out the halves of an HE federation.

    The server half is built from the *serialized public* context, so it provably never
    sees the secret key; each site gets its own copy of the secret context, an Ed25519
    signing key and every site's verifying key.  The model size comes from ``layout`` (a
    :class:`securefl.vector.Layout`, required when ``config.layers`` selects layers) or
    ``dimension``; ``server_lr`` is ``[server] lr``, applied by the sites.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefl.he.ckks import CKKSKeys
    from securefl.he.protection import HEClientProtection
    from securefl.he.server import HEServerProtection

    keys = CKKSKeys.generate(poly_modulus_degree=config.poly_modulus_degree,
                             coeff_modulus_bits=config.coeff_modulus_bits,
                             scale_bits=config.scale_bits)
    selection = layer_selection(config, layout)
    size = getattr(layout, "size", dimension)
    if not isinstance(size, int):
        raise ValueError("HE needs the model size: pass layout or dimension")
    secret = keys.to_bytes()
    signing = {cid: Ed25519PrivateKey.generate() for cid in client_ids}
    verify = {cid: key.public_key() for cid, key in signing.items()}
    server = HEServerProtection.from_bytes(
        keys.public().to_bytes(), verify_keys=verify,
        min_contributors=config.min_contributors, selection=selection, resum=config.resum)
    clients = {cid: HEClientProtection.from_bytes(
        secret, client_id=cid, signing_key=signing[cid], verify_keys=verify, dimension=size,
        min_contributors=config.min_contributors, selection=selection, server_lr=server_lr,
        resum=config.resum)
        for cid in client_ids}
    return server, clients


def layer_selection(config: HEConfig, layout: object = None) -> Selection | None:
    """The coordinates to encrypt: ``None`` (all of them) unless ``config.layers`` selects
    layers of ``layout`` (a :class:`securefl.vector.Layout`); a pattern that matches no
    parameter raises :class:`~securefl.errors.ConfigError` (one line, simulation and
    deployment alike)."""
    if not config.layers:
        return None
    if layout is None:
        raise ValueError("[protection.he] layers needs the model layout to select "
                         "parameters by name")
    from securefl.errors import ConfigError
    from securefl.he.packing import Selection

    try:
        return Selection.of_layers(layout, config.layers)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"[protection.he] layers: {exc}") from None


def site_view(server: HEServerProtection, site: HEClientProtection, *, run: bytes,
              initial: np.ndarray) -> Callable[[], np.ndarray]:
    """*Simulation only*, where the experimenter holds every site's key: the global model
    that ``site`` would decrypt now (``initial`` before the first sum).  The server half
    never calls this; it has no key."""
    initial = np.array(initial, dtype=np.float32)

    def view() -> np.ndarray:
        state = server.state
        return initial if state is None else site.open_state(state, run=run)
    return view
