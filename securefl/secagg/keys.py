"""Key material of one SecAgg round (Bonawitz et al., CCS 2017, figure 4).

* Long-term identity: an Ed25519 key per client; the server holds only the public keys.
* Round keys: two X25519 pairs, ``c`` (encrypts shares) and ``s`` (derives pairwise masks),
  advertised with an Ed25519 signature over ``info("advertise", round, id) || c_pk || s_pk``.
* Share encryption: ``k_uv = HKDF(X25519(c_u, c_v), info("share-key", round, u, v))``, then
  AES-256-GCM with a random 96-bit nonce and associated data ``info("share", round, u, v)``,
  so a ciphertext is bound to its sender, receiver, round and direction.
* Masks: ``PRG(b_u)`` under ``info("self-mask", round, u)`` and ``PRG(X25519(s_u, s_v))``
  under ``info("pair-mask", round, min(u, v), max(u, v))``.

Every failure (bad signature, bad ciphertext, degenerate public key) raises the opaque
:class:`~securefl.errors.ProtocolAbort`; the reason goes to the operator log only.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from securefl.errors import ProtocolAbort
from securefl.secagg.prg import derive_key, info, prg_key

__all__ = [
    "KEY_BYTES",
    "agree",
    "decrypt_shares",
    "encrypt_shares",
    "generate_identity",
    "identity_public_bytes",
    "pairwise_mask_key",
    "private_bytes",
    "public_bytes",
    "self_mask_key",
    "sign_advertisement",
    "verify_advertisement",
]

KEY_BYTES = 32
_NONCE_BYTES = 12
_AES_GCM_KEY_BYTES = 32


def generate_identity() -> Ed25519PrivateKey:
    """A fresh long-term Ed25519 identity key."""
    return Ed25519PrivateKey.generate()


def identity_public_bytes(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _advertised(round: int, client_id: str, c_public: bytes, s_public: bytes) -> bytes:
    return info("advertise", round, client_id) + c_public + s_public


def sign_advertisement(identity: Ed25519PrivateKey, *, round: int, client_id: str,
                       c_public: bytes, s_public: bytes) -> bytes:
    """Ed25519 signature binding both round public keys to the client and the round."""
    return identity.sign(_advertised(round, client_id, c_public, s_public))


def verify_advertisement(identity_public: bytes, signature: bytes, *, round: int,
                         client_id: str, c_public: bytes, s_public: bytes) -> None:
    """Raise :class:`ProtocolAbort` unless ``signature`` is the client's, for this round."""
    if len(c_public) != KEY_BYTES or len(s_public) != KEY_BYTES or c_public == s_public:
        raise ProtocolAbort.because(f"malformed key advertisement from {client_id!r}")
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(
            signature, _advertised(round, client_id, c_public, s_public))
    except (InvalidSignature, ValueError):
        raise ProtocolAbort.because(
            f"bad advertisement signature from {client_id!r} in round {round}") from None


def agree(private: X25519PrivateKey, peer_public: bytes, *, peer: str) -> bytes:
    """X25519 shared secret (RFC 7748); a low-order peer key aborts."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ProtocolAbort.because(f"invalid X25519 public key from {peer!r}") from None


def self_mask_key(seed: bytes, *, round: int, client_id: str) -> bytes:
    """AES-128 key of the self mask ``PRG(b_u)``."""
    return prg_key(seed, info("self-mask", round, client_id))


def pairwise_mask_key(shared: bytes, *, round: int, first: str, second: str) -> bytes:
    """AES-128 key of the pairwise mask ``PRG(s_uv)``; symmetric in the two ids."""
    low, high = sorted((first, second))
    return prg_key(shared, info("pair-mask", round, low, high))


def _share_key(shared: bytes, *, round: int, sender: str, receiver: str) -> bytes:
    return derive_key(shared, info("share-key", round, sender, receiver),
                      length=_AES_GCM_KEY_BYTES)


def encrypt_shares(shared: bytes, plaintext: bytes, *, round: int, sender: str,
                   receiver: str) -> bytes:
    """``nonce || AES-GCM(k_uv, nonce, plaintext, aad)``: the bundle ``sender -> receiver``."""
    return _encrypt_with_nonce(shared, plaintext, os.urandom(_NONCE_BYTES), round=round,
                               sender=sender, receiver=receiver)


def _encrypt_with_nonce(shared: bytes, plaintext: bytes, nonce: bytes, *, round: int,
                        sender: str, receiver: str) -> bytes:
    key = _share_key(shared, round=round, sender=sender, receiver=receiver)
    aad = info("share", round, sender, receiver)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_shares(shared: bytes, ciphertext: bytes, *, round: int, sender: str,
                   receiver: str) -> bytes:
    """Inverse of :func:`encrypt_shares`; any tampering raises :class:`ProtocolAbort`."""
    key = _share_key(shared, round=round, sender=sender, receiver=receiver)
    aad = info("share", round, sender, receiver)
    try:
        return AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolAbort.because(
            f"share ciphertext {sender!r} -> {receiver!r} failed authentication") from None
