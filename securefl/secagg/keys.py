"""Key material of one SecAgg round (Bonawitz et al., CCS 2017, figure 4).

* Long-term identity: an Ed25519 key per client; the server holds only the public keys.
* Round keys: two X25519 pairs, ``c`` (encrypts shares) and ``s`` (derives pairwise masks),
  advertised with an Ed25519 signature (:func:`advert_body`) that also binds the participant
  list and the commitments ``H(r_u)`` (graph randomness) and ``H(b_u)`` (self-mask seed).
* Consistency (Bonawitz et al. §4, active adversary): each survivor signs the survivor set
  ``U3`` (:func:`consistency_body`).
* Every ``info`` is scoped (:class:`~securefl.secagg.scope.Scope`): federation, run, round
  and, after the graph is fixed, its seed.
* Share encryption: one derivation per pair and round,
  ``k_{lo->hi} || k_{hi->lo} = HKDF(X25519(c_u, c_v), info("share-keys", lo, hi), L = 64)``
  with ``lo < hi`` the two ids (:func:`channel_keys`), then AES-256-GCM under the sender's
  direction key with a random 96-bit nonce and associated data ``info("share", u, v)``, so a
  ciphertext is bound to its sender, receiver, round and direction.  One 64-byte output
  split by position is as good as two derivations: HKDF-Expand (RFC 5869, §2.3) is a PRF
  keyed by the extracted key, so its output stream is indistinguishable from uniform and
  its two halves are independent keys; ``info`` binds label, federation, run, round, graph
  and both ids as before.
* Masks: ``PRG(b_u)`` under ``info("self-mask", u)`` and ``PRG(X25519(s_u, s_v))``
  under ``info("pair-mask", min(u, v), max(u, v))``.

Every failure (bad signature, bad ciphertext, degenerate public key) raises the opaque
:class:`~securefl.errors.ProtocolAbort`; the reason goes to the operator log only.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence

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
from securefl.secagg.prg import derive_key, info_with_prefix, prg_key
from securefl.secagg.scope import Scope

__all__ = [
    "KEY_BYTES",
    "advert_body",
    "agree",
    "channel_keys",
    "check_round_keys",
    "commitment",
    "consistency_body",
    "decrypt_shares",
    "encrypt_shares",
    "generate_identity",
    "identity_public_bytes",
    "opens",
    "pairwise_mask_key",
    "participants_digest",
    "private_bytes",
    "public_bytes",
    "self_mask_key",
    "sign",
    "verify",
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


def participants_digest(participants: Sequence[str]) -> bytes:
    """``SHA-256`` of the sorted participant list (length-prefixed ids), signed in adverts."""
    return hashlib.sha256(info_with_prefix(b"securefl/secagg/participants\x00",
                                           *sorted(participants))).digest()


def commitment(scope: Scope, label: str, client_id: str, value: bytes) -> bytes:
    """``SHA-256(info(label, u) || value)``: hiding for a 256-bit random ``value``, binding."""
    return _committed(scope.info(label), client_id, value)


def opens(scope: Scope, label: str, values: Mapping[str, bytes],
          commitments: Mapping[str, bytes]) -> bool:
    """Whether every ``values[u]`` opens ``commitments[u]`` (:func:`commitment`; each client
    opens all ``n`` of a round, so the shared ``info(label)`` prefix is built once)."""
    prefix = scope.info(label)
    return all(_committed(prefix, u, value) == commitments[u] for u, value in values.items())


def _committed(prefix: bytes, client_id: str, value: bytes) -> bytes:
    """:func:`commitment` from the prefix of ``info(label)``."""
    return hashlib.sha256(info_with_prefix(prefix, client_id) + value).digest()


def advert_body(scope: Scope, *, client_id: str, participants: bytes, c_public: bytes,
                s_public: bytes, graph_commitment: bytes, seed_commitment: bytes) -> bytes:
    """What an advertisement signs: ``info("advertise", u) || H(participants) || c_pk || s_pk
    || H(r_u) || H(b_u)``."""
    return (scope.info("advertise", client_id) + participants + c_public + s_public
            + graph_commitment + seed_commitment)


def consistency_body(scope: Scope, *, client_id: str, survivors: bytes) -> bytes:
    """What a consistency signature signs: ``info("consistency", u) || H(U3)``, with
    ``survivors = participants_digest(U3)`` (the scope includes the graph seed)."""
    return scope.info("consistency", client_id) + survivors


def sign(identity: Ed25519PrivateKey, body: bytes) -> bytes:
    return identity.sign(body)


def verify(identity_public: bytes, signature: bytes, body: bytes, *, signer: str,
           what: str) -> None:
    """Raise :class:`ProtocolAbort` unless ``signature`` is ``signer``'s over ``body``."""
    try:
        _identity_key(identity_public).verify(signature, body)
    except (InvalidSignature, ValueError):
        raise ProtocolAbort.because(f"bad {what} signature from {signer!r}") from None


# Parsed public keys, by their bytes: an identity key is checked thousands of times per
# round and every advertised round key by each of its neighbours.  Public values only; a
# malformed key raises (and is not cached).
@functools.lru_cache(maxsize=1 << 12)
def _identity_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=1 << 12)
def _round_key(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


def check_round_keys(c_public: bytes, s_public: bytes, *, client_id: str) -> None:
    if len(c_public) != KEY_BYTES or len(s_public) != KEY_BYTES or c_public == s_public:
        raise ProtocolAbort.because(f"malformed key advertisement from {client_id!r}")


def agree(private: X25519PrivateKey, peer_public: bytes, *, peer: str) -> bytes:
    """X25519 shared secret (RFC 7748); a low-order peer key aborts."""
    try:
        return private.exchange(_round_key(peer_public))
    except ValueError:
        raise ProtocolAbort.because(f"invalid X25519 public key from {peer!r}") from None


def self_mask_key(seed: bytes, *, scope: Scope, client_id: str) -> bytes:
    """AES-128 key of the self mask ``PRG(b_u)``."""
    return prg_key(seed, scope.info("self-mask", client_id))


def pairwise_mask_key(shared: bytes, *, scope: Scope, first: str, second: str) -> bytes:
    """AES-128 key of the pairwise mask ``PRG(s_uv)``; symmetric in the two ids."""
    low, high = sorted((first, second))
    return prg_key(shared, scope.info("pair-mask", low, high))


def channel_keys(shared: bytes, *, scope: Scope, first: str, second: str) -> tuple[bytes, bytes]:
    """The AES-256-GCM keys ``(k_{lo->hi}, k_{hi->lo})`` of one pair's share bundles, from one
    64-byte HKDF output (module docstring); symmetric in the two ids.  A client derives them
    once per neighbour and round, when it encrypts, and keeps them to decrypt."""
    low, high = sorted((first, second))
    stream = derive_key(shared, scope.info("share-keys", low, high),
                        length=2 * _AES_GCM_KEY_BYTES)
    return stream[:_AES_GCM_KEY_BYTES], stream[_AES_GCM_KEY_BYTES:]


def _direction(keys: tuple[bytes, bytes], sender: str, receiver: str) -> bytes:
    return keys[0] if sender < receiver else keys[1]


def encrypt_shares(keys: tuple[bytes, bytes], plaintext: bytes, *, scope: Scope, sender: str,
                   receiver: str) -> bytes:
    """``nonce || AES-GCM(k_{sender->receiver}, nonce, plaintext, aad)``: the bundle
    ``sender -> receiver``; ``keys`` from :func:`channel_keys`."""
    return _encrypt_with_nonce(keys, plaintext, os.urandom(_NONCE_BYTES), scope=scope,
                               sender=sender, receiver=receiver)


def _encrypt_with_nonce(keys: tuple[bytes, bytes], plaintext: bytes, nonce: bytes, *,
                        scope: Scope, sender: str, receiver: str) -> bytes:
    aad = scope.info("share", sender, receiver)
    return nonce + AESGCM(_direction(keys, sender, receiver)).encrypt(nonce, plaintext, aad)


def decrypt_shares(keys: tuple[bytes, bytes], ciphertext: bytes, *, scope: Scope, sender: str,
                   receiver: str) -> bytes:
    """Inverse of :func:`encrypt_shares`; any tampering raises :class:`ProtocolAbort`."""
    aad = scope.info("share", sender, receiver)
    try:
        return AESGCM(_direction(keys, sender, receiver)).decrypt(
            ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolAbort.because(
            f"share ciphertext {sender!r} -> {receiver!r} failed authentication") from None
