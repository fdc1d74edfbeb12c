"""What a SecAgg+ client masks, and how the server reads the unmasked sum: the encoding seam.

An :class:`Encoding` turns a client's update into words of ``Z_{2^b}`` and the sum of the
survivors' words back into ``(sum_i w_i x_i, sum_i w_i)``.  Masks are drawn modulo the same
``2^b`` (:func:`securefl.secagg.prg.add_masks` on words of :func:`word_dtype`, then
:func:`reduce`), so words travel at the chosen width: ``b <= 16`` as uint16, else uint32.

* :class:`FixedPoint` (the default): :class:`~securefl.secagg.quantize.Quantizer`'s ``d + 1``
  words modulo ``2^32``, the weight last; the decoded weight must lie in
  ``(0, |U3| (W + W / L)]``.
* :class:`securefl.privacy.distributed.SkellamEncoding`: distributed DP, each site adding
  its share of integer noise before masking.

``seed`` is public randomness shared by every party of the round, :func:`shared_seed`; an
encoding that needs none ignores it.  :meth:`Encoding.check_cohort` is the encoding's rule on
the number of survivors, which every site checks before it signs the survivor set (so before
anything is revealed), and the server before it asks for the consistency signatures.
:meth:`Encoding.removable` is how many of the secrets ``encode`` returned (distributed DP's
excess-noise seeds) a site of a verified survivor set ``U3`` adds to its unmask reply, and
the server hands them to ``decode`` as ``removed`` (none for :class:`FixedPoint`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, TypeGuard, runtime_checkable

import numpy as np

from securefl.config.secagg import SecAggConfig
from securefl.engine.protection import PerClass, Update
from securefl.secagg.prg import PRG_KEY_BYTES, derive_key
from securefl.secagg.quantize import Quantizer, levels_for
from securefl.secagg.scope import Scope

__all__ = ["SECRET_BYTES", "Checked", "Encoding", "FixedPoint", "checks_first", "reduce",
           "reveal_problem", "shared_seed", "word_dtype"]

#: bytes of each secret an encoding lets a survivor reveal (:meth:`Encoding.removable`)
SECRET_BYTES = 32


def reveal_problem(secrets: Sequence[bytes], *, expected: int) -> str | None:
    """Why a survivor's revealed secrets are not ``expected`` of :data:`SECRET_BYTES` bytes
    each (the encoding's ``removable(|U3|)``), or ``None`` when they are."""
    sizes = sorted({len(s) for s in secrets})
    if len(secrets) == expected and sizes in ([], [SECRET_BYTES]):
        return None
    return (f"{len(secrets)} revealed secrets of {sizes[:3]} bytes, expected {expected} of "
            f"{SECRET_BYTES} bytes")


@runtime_checkable
class Encoding(Protocol):
    #: words live in ``Z_{2^bits}``
    bits: int

    def words(self, dimension: int) -> int:
        """How many words an update of ``dimension`` coordinates becomes."""
        ...

    def encode(self, update: Update, *, seed: bytes) -> tuple[np.ndarray, tuple[bytes, ...]]:
        """The words (:func:`word_dtype`, each below ``2^bits``) and the secrets a survivor
        may later reveal, in order (:meth:`removable`); ``ValueError`` if unusable."""
        ...

    def removable(self, survivors: int) -> int:
        """How many of those secrets a site reveals when ``|U3| = survivors``."""
        ...

    def decode(self, total: np.ndarray, *, seed: bytes, survivors: int, dimension: int,
               removed: Sequence[Sequence[bytes]] = ()) -> tuple[np.ndarray, float]:
        """``(sum, total weight)`` of ``survivors`` encodings of ``dimension``-vectors, with
        the revealed secrets of each site that revealed (``removed``); ``ValueError`` if
        impossible."""
        ...

    def check_cohort(self, survivors: int) -> str | None:
        """Why ``survivors`` clients are too few for this encoding, or ``None``."""
        ...


@runtime_checkable
class Checked(Protocol):
    """An encoding that can refuse an update before encoding it.  A site then checks its
    update when the round opens (an unusable one keeps it out before it advertises keys, as
    encoding it would) and encodes it only when its masked input is due, so the words are
    written, masked and sent while they are in cache; a site encodes at once under an
    encoding without the check."""

    def check(self, update: Update) -> None:
        """``ValueError`` if :meth:`Encoding.encode` would refuse ``update``."""
        ...


_CHECKS_FIRST = PerClass(Checked)


def checks_first(encoding: Encoding) -> TypeGuard[Checked]:
    """``isinstance(encoding, Checked)`` (:class:`~securefl.engine.protection.PerClass`:
    asked on every round of every site)."""
    return _CHECKS_FIRST(encoding)


def word_dtype(bits: int) -> np.dtype:
    """``<u2`` for ``bits <= 16``, ``<u4`` up to 32."""
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in [2, 32], got {bits}")
    return np.dtype("<u2") if bits <= 16 else np.dtype("<u4")


def reduce(words: np.ndarray, bits: int) -> np.ndarray:
    """``words mod 2^bits`` in place (a no-op at the dtype's full width)."""
    if bits < 8 * words.dtype.itemsize:
        np.bitwise_and(words, words.dtype.type((1 << bits) - 1), out=words)
    return words


def shared_seed(scope: Scope) -> bytes:
    """``HKDF-SHA256(ikm = federation || run || round, info = ".../shared-randomness")``:
    32 public bytes that every party of the round derives alike, and that the server cannot
    choose per site (the graph seed is left out so that a site can encode at ``open``)."""
    base = Scope(federation=scope.federation, run=scope.run, round=scope.round)
    return derive_key(base.encoded(), b"shared-randomness", length=32)


class FixedPoint:
    """:class:`~securefl.secagg.quantize.Quantizer` as an :class:`Encoding` (``L`` sized from
    the directory's ``num_sites``, never from the server's ``n``)."""

    bits = 32

    def __init__(self, config: SecAggConfig, *, num_sites: int) -> None:
        self.quantizer = Quantizer(clip=config.clip, max_weight=config.max_weight,
                                   levels=levels_for(num_sites, bits=config.bits))

    def words(self, dimension: int) -> int:
        return dimension + 1

    def check(self, update: Update) -> None:
        self.quantizer.check(update.delta, float(update.weight))

    def encode(self, update: Update, *, seed: bytes) -> tuple[np.ndarray, tuple[bytes, ...]]:
        # a fresh AES-128 key from the CSPRNG: the dither is private and used once
        words = self.quantizer.encode_keyed(update.delta, float(update.weight),
                                            dither_key=os.urandom(PRG_KEY_BYTES))
        return words, ()

    def removable(self, survivors: int) -> int:
        return 0

    def decode(self, total: np.ndarray, *, seed: bytes, survivors: int, dimension: int,
               removed: Sequence[Sequence[bytes]] = ()) -> tuple[np.ndarray, float]:
        if any(removed):
            raise ValueError("the fixed-point encoding has nothing to remove")
        weighted, total_weight = self.quantizer.decode(total)
        most = survivors * (self.quantizer.max_weight + self.quantizer.weight_step)
        if not 0 < total_weight <= most:
            raise ValueError(f"decoded total weight {total_weight} outside (0, {most}]")
        return weighted, total_weight

    def check_cohort(self, survivors: int) -> str | None:
        return None
