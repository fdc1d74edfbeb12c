"""A deployment's key material beyond TLS: site identities and CKKS contexts.

Written by ``securefl certs init`` (:mod:`securefl.runtime.tls`); read by
:mod:`securefl.runtime.deploy`.  Secret files are written atomically with mode 0600.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.config.he import HEConfig
from securefl.output import atomic_write

__all__ = ["init_he_context", "init_identities"]


def init_identities(directory: str | Path, sites: Sequence[str]) -> dict[str, str]:
    """Create each site's Ed25519 identity and the public ``identities.json``."""
    directory = Path(directory)
    public = {}
    for site in sites:
        key = Ed25519PrivateKey.generate()
        atomic_write(directory / "sites" / f"{site}.identity",
                     key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), mode=0o600)
        public[site] = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw).hex()
    (directory / "identities.json").write_text(json.dumps(public, indent=2, sort_keys=True))
    return public


def init_he_context(directory: str | Path, config: HEConfig) -> None:
    """Generate fresh CKKS keys as the federation's key holder: secret for sites, public for
    all.  Run it again for every new federation run (the sites refuse a reused key id)."""
    from securefl.he import CKKSKeys

    keys = CKKSKeys.generate(poly_modulus_degree=config.poly_modulus_degree,
                             coeff_modulus_bits=config.coeff_modulus_bits,
                             scale_bits=config.scale_bits)
    base = Path(directory) / "he"
    atomic_write(base / "secret.ctx", keys.to_bytes(), mode=0o600)
    (base / "public.ctx").write_bytes(keys.public().to_bytes())
