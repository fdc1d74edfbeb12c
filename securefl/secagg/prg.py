"""Pseudorandom generator for masks: HKDF-SHA256 key derivation, then AES-128-CTR.

``PRG(secret, info)`` (Bonawitz et al., CCS 2017: the PRG that expands a seed into
a mask) is

    key  = HKDF-SHA256(ikm=secret, salt=None, info="securefl/secagg/v3/" || info, L=16)
    PRG  = AES-128-CTR(key, counter block 0^128) applied to zero bytes,
           read as little-endian uint32 words.

Every stream has its own key (the ``info`` binds a label, the federation, run, round and graph
(:class:`~securefl.secagg.scope.Scope`) and the client ids, see :func:`info`), so the fixed
initial counter block never repeats under one key. The secret must carry at least 128 bits of
entropy (securefl uses 256-bit seeds and X25519 secrets).

Why AES-128: the protocol's security level is that of X25519 and Ed25519, about 128 bits,
the level of TLS 1.3's must-implement suite (AES-128-GCM, commonly keyed through X25519).
A stream of ``m`` blocks under one key is distinguishable from a uniform string with advantage
about ``m^2 / 2^129`` (PRP/PRF switching): ``2^-93`` for a 4 MB mask.  AES-256 would add no margin
the key agreement lacks, and its keystream takes 40% longer; the keystream (one stream per
survivor) is most of the server's unmasking time.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PRG_KEY_BYTES",
    "PROTOCOL_LABEL",
    "WIRE_VERSION",
    "Keystream",
    "add_masks",
    "derive_key",
    "encoded_id",
    "info",
    "info_prefix",
    "info_with_prefix",
    "keystream",
    "prg_key",
    "prg_words",
]

PROTOCOL_LABEL = b"securefl/secagg/v3/"
#: the format of what SecAgg+ parties exchange (share encoding: nine 30-bit limbs over
#: GF(2^31 - 1); one 64-byte HKDF per pair for both share-bundle keys; the tables of ids to
#: bytes as the codec's ``$mb`` nodes, frames of version 2).  It is part of the
#: hello check's manifest, so parties of two formats refuse each other before round 1,
#: naming the difference, instead of aborting in the middle of a round.
WIRE_VERSION = 5
PRG_KEY_BYTES = 16
_ZERO_BLOCK = bytes(16)
_CTR_ZERO = modes.CTR(_ZERO_BLOCK)  # the mode only holds the initial counter block
_SHA256 = hashes.SHA256()
# 128 KiB of keystream per step: the keystream and its accumulator block stay well inside a
# 1 MiB L2 cache (each add is bound by cache bandwidth: 256 KiB blocks measured 15% slower at
# d = 100K), and the blocks are large enough that Python's cost per call stays small.
_BLOCK_WORDS = 1 << 15
_ZEROS = memoryview(bytes(4 * _BLOCK_WORDS))  # the plaintext of every keystream block


def info(label: str, scope: bytes, *client_ids: str) -> bytes:
    """HKDF ``info``: ``label || 0x00 || scope || (len (u16 BE) || id)*``, where ``scope`` is
    :meth:`securefl.secagg.scope.Scope.encoded` (federation, run, round, graph seed)."""
    return info_with_prefix(info_prefix(label, scope), *client_ids)


def info_prefix(label: str, scope: bytes) -> bytes:
    """``label || 0x00 || scope``: the part of :func:`info` shared by every id (a
    :class:`~securefl.secagg.scope.Scope` keeps one per label)."""
    return _label(label) + scope


def info_with_prefix(prefix: bytes, *client_ids: str) -> bytes:
    """:func:`info` from its :func:`info_prefix` (thousands of calls per round, nearly all
    with one or two ids: those without the join)."""
    if len(client_ids) == 1:
        return prefix + encoded_id(client_ids[0])
    if len(client_ids) == 2:
        return prefix + encoded_id(client_ids[0]) + encoded_id(client_ids[1])
    return prefix + b"".join(map(encoded_id, client_ids))


@functools.lru_cache(maxsize=64)
def _label(label: str) -> bytes:
    return label.encode() + b"\x00"


@functools.lru_cache(maxsize=1 << 16)
def encoded_id(client_id: str) -> bytes:
    """``len (u16 BE) || id``: public, and asked for thousands of times per round."""
    raw = client_id.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("client id longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def derive_key(secret: bytes, context: bytes, *, length: int) -> bytes:
    """``HKDF-SHA256(secret, salt=None, info=PROTOCOL_LABEL || context)`` -> ``length`` bytes."""
    return HKDF(algorithm=_SHA256, length=length, salt=None,
                info=PROTOCOL_LABEL + context).derive(secret)


def prg_key(secret: bytes, context: bytes) -> bytes:
    """The AES-128 key of the stream ``PRG(secret, context)``."""
    return derive_key(secret, context, length=PRG_KEY_BYTES)


def _encryptor(key: bytes) -> CipherContext:
    if len(key) != PRG_KEY_BYTES:
        raise ValueError(f"a PRG key is {PRG_KEY_BYTES} bytes (AES-128), got {len(key)}")
    return Cipher(algorithms.AES(key), _CTR_ZERO).encryptor()


def keystream(key: bytes, count: int) -> np.ndarray:
    """The first ``count`` words of ``AES-128-CTR(key, 0^128)``, little-endian uint32."""
    stream = Keystream(key, count)
    stream.fill(count)
    return stream.words


class Keystream:
    """:func:`keystream` written on demand: ``words`` (``count`` uint32, a fresh buffer) holds
    the stream up to ``filled``, and :meth:`fill` extends it in order, so a caller can use each
    block of it while that block is still in cache (the quantizer's dither)."""

    def __init__(self, key: bytes, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        # update_into needs block_size - 1 spare bytes; not zero-filled: every word is written
        # before it is read
        buffer = np.empty(4 * count + 16, np.uint8)
        self._view, self._encryptor = buffer.data, _encryptor(key)
        self.words = buffer[:4 * count].view("<u4")
        self.filled = 0

    def fill(self, stop: int) -> None:
        """Write the stream's words ``filled .. stop - 1`` (``stop <= count``)."""
        if not self.filled <= stop <= self.words.shape[0]:
            raise ValueError(f"cannot fill words {self.filled} to {stop}")
        view, encryptor = self._view, self._encryptor
        for start in range(4 * self.filled, 4 * stop, len(_ZEROS)):  # block by block
            size = min(len(_ZEROS), 4 * stop - start)
            encryptor.update_into(_ZEROS[:size], view[start:start + size + 15])
        self.filled = stop


def add_masks(accumulator: np.ndarray, keys: Sequence[tuple[bytes, int]]) -> None:
    """``accumulator += sum_i sign_i * keystream(key_i)  (mod 2**32)``, in place; on a uint16
    accumulator the keystream is read as little-endian uint16 words, modulo ``2**16``.

    The streams are expanded one cache-sized block at a time, so each block of the
    accumulator is read and written while it sits in cache instead of once per stream.
    """
    if accumulator.dtype not in (np.uint16, np.uint32) or accumulator.ndim != 1:
        raise ValueError("the accumulator must be a 1-d uint32 or uint16 array")
    width = accumulator.dtype.itemsize
    encryptors = [(_encryptor(key), sign) for key, sign in keys]
    zeros = _ZEROS[:width * _BLOCK_WORDS]
    buffer = np.empty(width * _BLOCK_WORDS + 16, np.uint8)  # not zero-filled: written first
    words, output = buffer[:width * _BLOCK_WORDS].view(f"<u{width}"), buffer.data
    for start in range(0, accumulator.shape[0], _BLOCK_WORDS):
        block = accumulator[start:start + _BLOCK_WORDS]
        size = block.shape[0]
        source = zeros if size == _BLOCK_WORDS else zeros[:width * size]
        for encryptor, sign in encryptors:
            encryptor.update_into(source, output)
            if sign > 0:
                np.add(block, words[:size], out=block)
            else:
                np.subtract(block, words[:size], out=block)


def prg_words(secret: bytes, context: bytes, count: int) -> np.ndarray:
    """``PRG(secret, context)`` as ``count`` uint32 words."""
    return keystream(prg_key(secret, context), count)
