"""SecAgg+ as an engine protection: the server and client factories.

The server side holds the public identity directory ``{client_id: Ed25519 public key}`` and
nothing secret. Both sides derive the federation id from their own directory and config
(:func:`~securefl.secagg.scope.federation_id`). Each client holds its own Ed25519 identity
private key and the same directory (to verify its neighbours' key advertisements). A deployment
builds these from its own key store; :func:`build_simulation` generates identities in-process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.config.secagg import SecAggConfig
from securefl.engine.session import RoundContext
from securefl.secagg.client import SecAggClientRound
from securefl.secagg.encoding import Encoding
from securefl.secagg.keys import KEY_BYTES, generate_identity, identity_public_bytes
from securefl.secagg.scope import federation_id
from securefl.secagg.server import SecAggServerRound

__all__ = ["SecAggClientProtection", "SecAggServerProtection", "build_simulation"]


def _checked_directory(directory: Mapping[str, bytes]) -> Mapping[str, bytes]:
    for client_id, key in directory.items():
        if not isinstance(client_id, str) or not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"directory entry {client_id!r} must map a str id to a 32-byte "
                             "Ed25519 public key")
    return MappingProxyType(dict(directory))


class SecAggServerProtection:
    """Server factory: one :class:`SecAggServerRound` per round; reveals only the sum."""

    name = "secagg"
    reveals_rows = False

    def __init__(self, *, directory: Mapping[str, bytes], config: SecAggConfig,
                 encoding: Encoding | None = None) -> None:
        config.validate()
        self.directory = _checked_directory(directory)
        self.config = config
        self.encoding = encoding
        self.federation = federation_id(self.directory, config,
                                        encoding=getattr(encoding, "agreed", None))

    def check_cohort(self, survivors: int) -> str | None:
        """The encoding's rule on the survivor count (distributed DP's minimum cohort)."""
        return None if self.encoding is None else self.encoding.check_cohort(survivors)

    def server_round(self, *, round: int, dimension: int,
                     run: bytes | None = None) -> SecAggServerRound:
        return SecAggServerRound(round=round, dimension=dimension, directory=self.directory,
                                 config=self.config, federation=self.federation, run=run,
                                 encoding=self.encoding)


class SecAggClientProtection:
    """Client factory: owns the client's identity key; one :class:`SecAggClientRound` per round."""

    name = "secagg"

    def __init__(self, *, client_id: str, identity: Ed25519PrivateKey,
                 directory: Mapping[str, bytes], config: SecAggConfig,
                 encoding: Encoding | None = None) -> None:
        config.validate()
        self.directory = _checked_directory(directory)
        self.encoding = encoding
        if self.directory.get(client_id) != identity_public_bytes(identity):
            raise ValueError(f"the directory entry of {client_id!r} is not this identity's "
                             "public key")
        self.client_id = client_id
        self.config = config
        self.federation = federation_id(self.directory, config,
                                        encoding=getattr(encoding, "agreed", None))
        self._identity = identity

    def client_round(self, *, round: int, context: RoundContext) -> SecAggClientRound:
        if round != context.round:
            raise ValueError(f"round {round} does not match its context's {context.round}")
        return SecAggClientRound(client_id=self.client_id, identity=self._identity,
                                 directory=self.directory, config=self.config,
                                 federation=self.federation, context=context,
                                 encoding=self.encoding)


def build_simulation(config: SecAggConfig, client_ids: Sequence[str], *,
                     encoding: Encoding | None = None,
                     ) -> tuple[SecAggServerProtection, dict[str, SecAggClientProtection]]:
    """In-process deployment: a fresh Ed25519 identity per client and the public directory;
    ``encoding`` replaces the default fixed-point one on every side (distributed DP)."""
    identities = {cid: generate_identity() for cid in client_ids}
    directory = {cid: identity_public_bytes(key) for cid, key in identities.items()}
    server = SecAggServerProtection(directory=directory, config=config, encoding=encoding)
    clients = {cid: SecAggClientProtection(client_id=cid, identity=key, directory=directory,
                                           config=config, encoding=encoding)
               for cid, key in identities.items()}
    return server, clients
