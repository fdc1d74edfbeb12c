"""The HE protection's messages, and the signed statement each upload makes.

Every upload is signed (Ed25519, the site's identity key) over

    SHA-256( "securefl/he/upload/v2" | run | round | client id | key id | unit | weight
             | model | SHA-256(ciphertexts, clear part) )

with every field length-prefixed; ``model`` is the SHA-256 of the *decrypted* global model
the site trained from (:func:`securefl.engine.session.model_digest`).  The server checks it
before summing; every site checks the signed statements of all contributors again before it
decrypts the aggregate they make up (:class:`HEState`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from securefl.engine.messages import Message, message

__all__ = ["HEContribution", "HEPart", "HERoundOpen", "HEState", "HEUpload", "statement",
           "upload_digest"]

_DOMAIN = b"securefl/he/upload/v2"


@message
class HEContribution(Message):
    """One contributor's signed statement about its upload (small: no ciphertext)."""

    client_id: str
    weight: float
    model: bytes
    upload: bytes  # upload_digest of its ciphertexts and clear part
    signature: bytes


@message
class HEPart(Message):
    """One contributor's upload inside an :class:`HEState` when the sites re-sum."""

    ciphertexts: list[bytes]
    clear: np.ndarray


@message
class HEState(Message):
    """The encrypted global model the server keeps: the sum of round ``round``'s uploads.

    Decrypted by a site, ``x = (2^unit_log2 / sum of weights) * Dec(ciphertexts)`` on the
    encrypted coordinates and ``clear`` on the others (layer selection only).  With
    ``[protection.he] resum`` the sum is left to the sites: ``ciphertexts`` is empty and
    ``parts`` holds every contributor's upload, in the order of ``contributions``.
    """

    round: int
    unit_log2: int
    contributions: tuple[HEContribution, ...]
    ciphertexts: list[bytes]
    parts: list[HEPart]
    clear: np.ndarray


@message
class HERoundOpen(Message):
    """Server -> site with ``FitIns``: the key in use, the weight unit ``2^unit_log2`` for
    this round's uploads, and the encrypted global model (``None`` before the first sum)."""

    key_id: bytes
    unit_log2: int
    state: HEState | None


@message
class HEUpload(Message):
    """Site -> server: encrypted ``(w / u) (x + lr delta)`` (seeded), and its statement."""

    run: bytes
    key_id: bytes
    unit_log2: int
    weight: float
    model: bytes
    ciphertexts: list[bytes]
    clear: np.ndarray
    signature: bytes


def _hash(parts: Sequence[bytes], *, prefix: bytes = b"") -> bytes:
    digest = hashlib.sha256(prefix)
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.digest()


def upload_digest(ciphertexts: Sequence[bytes], clear: np.ndarray) -> bytes:
    """SHA-256 over the length-prefixed ciphertexts and the float32 clear part."""
    return _hash([np.ascontiguousarray(clear, dtype="<f4").tobytes(), *ciphertexts])


def statement(*, run: bytes, round: int, client_id: str, key_id: bytes, unit_log2: int,
              weight: float, model: bytes, upload: bytes) -> bytes:
    """What a site signs for its upload of ``round`` (module docstring)."""
    return _hash([run, struct.pack("<q", round), client_id.encode(), key_id,
                  struct.pack("<q", unit_log2), struct.pack("<d", weight), model, upload],
                 prefix=_DOMAIN)
