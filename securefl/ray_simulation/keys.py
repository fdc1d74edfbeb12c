"""The driver's part of a Ray simulation's key set-up (see :mod:`securefl.ray_simulation`).

As in a deployment, each actor generates its sites' identity keys (SecAgg+ Ed25519
identities, HE signing keys) and announces only the public halves; the driver collects them
into the directory and hands it back to every actor (:meth:`KeyHolder.exchange`).  Under HE
the experimenter is the key holder: the driver generates the CKKS keys and gives the secret
context to the actors (Ray's pickle, inside the one trust domain of
:mod:`securefl.engine.ray_backend`) after they started, so that the key generation overlaps
their imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from securefl.config import Config
from securefl.engine.protection import ClientProtection, KeepsModel, Plain, ServerProtection
from securefl.engine.ray_backend import import_ray
from securefl.vector import Layout

__all__ = ["KeyHolder", "he_site"]


class KeyHolder:
    """The driver's part of the protection's key set-up (see the module doc)."""

    def __init__(self, config: Config, layout: Layout) -> None:
        self.config, self.layout = config, layout
        self._secret: bytes | None = None
        if config.protection.kind == "he":
            from securefl.he.ckks import CKKSKeys

            he = config.protection.he
            keys = CKKSKeys.generate(poly_modulus_degree=he.poly_modulus_degree,
                                     coeff_modulus_bits=he.coeff_modulus_bits,
                                     scale_bits=he.scale_bits)
            self._secret = keys.to_bytes()
            self._public = keys.public().to_bytes()

    def exchange(self, hosts: Sequence[Any], ids: Sequence[str]) -> dict[str, bytes]:
        """The key set-up with the actors (started): collect the public keys their sites
        announce into the directory, hand the directory back to every actor and, under HE,
        the secret context; return the directory (empty for plain sites, which have no keys
        to exchange)."""
        if self.config.protection.kind == "plain":
            return {}
        ray = import_ray()
        directory: dict[str, bytes] = {}
        for announced in ray.get([host.announce.remote() for host in hosts]):
            directory.update(announced)
        if directory and sorted(directory) != sorted(ids):
            raise ValueError("the actors announced keys for other sites than the federation's")
        # one caller's calls to an actor run in order: the secret arrives before attach
        calls = [] if self._secret is None else [
            host.ask.remote("hold_he_secret", self._secret) for host in hosts]
        if directory:
            calls += [host.attach.remote(directory) for host in hosts]
        ray.get(calls)
        return directory

    def server(self, directory: Mapping[str, bytes]) -> ServerProtection:
        kind = self.config.protection.kind
        if kind == "secagg":
            from securefl.build import secagg_encoding
            from securefl.secagg import SecAggServerProtection

            return SecAggServerProtection(
                directory=directory, config=self.config.protection.secagg,
                encoding=secagg_encoding(self.config, len(directory)))
        if kind == "he":
            from securefl.he import layer_selection
            from securefl.he.server import HEServerProtection

            he = self.config.protection.he
            return HEServerProtection.from_bytes(
                self._public, verify_keys=_verify_keys(directory),
                min_contributors=he.min_contributors,
                selection=layer_selection(he, self.layout), resum=he.resum)
        return Plain()

    def view(self, protection: ServerProtection, directory: Mapping[str, bytes], *,
             run: bytes, initial: np.ndarray) -> Callable[[], np.ndarray] | None:
        """HE: the model a site decrypts, read by the experimenter who holds the key."""
        if not isinstance(protection, KeepsModel) or self._secret is None:
            return None
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from securefl.he import site_view

        reader = he_site(self.config, self._secret, "experimenter",
                         Ed25519PrivateKey.generate(), directory, self.layout)
        return site_view(protection, reader, run=run, initial=initial)  # type: ignore[arg-type]


def _verify_keys(directory: Mapping[str, bytes]) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return {cid: Ed25519PublicKey.from_public_bytes(key) for cid, key in directory.items()}


def he_site(config: Config, secret: bytes, client_id: str, signing: Any,
            directory: Mapping[str, bytes], layout: Layout) -> ClientProtection:
    """A site's HE protection: the key holder's CKKS ``secret`` context, the site's own
    ``signing`` key and the directory's verification keys."""
    from securefl.he import HEClientProtection, layer_selection

    he = config.protection.he
    return HEClientProtection.from_bytes(
        secret, client_id=client_id, signing_key=signing, verify_keys=_verify_keys(directory),
        dimension=layout.size, min_contributors=he.min_contributors,
        selection=layer_selection(he, layout), server_lr=config.server.lr, resum=he.resum)
