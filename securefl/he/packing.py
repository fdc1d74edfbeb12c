"""Packing a real vector into CKKS slots, and optional layer selection.

Two reals share one complex slot, ``z_k = x_{2k} + i x_{2k+1}`` (CKKS encodes complex
vectors; Cheon et al., ASIACRYPT 2017), so a ciphertext of ring degree ``N`` carries ``N``
reals and a ``d``-vector needs ``ceil(d / N)`` ciphertexts; the last is zero-padded.

:class:`Selection` encrypts only some coordinates (e.g. chosen layers) and sends the rest in
the clear.  This is a weaker setting: the server sees every client's unselected
coordinates, which is enough for gradient inversion on those layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

__all__ = ["Selection", "pack", "unpack"]


def pack(values: np.ndarray, reals_per_ciphertext: int) -> Iterator[np.ndarray]:
    """Yield complex128 chunks of ``reals_per_ciphertext / 2`` slots covering ``values``."""
    if reals_per_ciphertext < 2 or reals_per_ciphertext % 2:
        raise ValueError(f"reals_per_ciphertext must be even and >= 2, got "
                         f"{reals_per_ciphertext}")
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    for start in range(0, flat.size, reals_per_ciphertext):
        chunk = flat[start:start + reals_per_ciphertext]
        if chunk.size < reals_per_ciphertext:
            chunk = np.concatenate([chunk, np.zeros(reals_per_ciphertext - chunk.size)])
        yield chunk.view(np.complex128)  # (re, im) pairs are adjacent float64s


def unpack(chunks: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``length`` reals of the complex chunks (float64)."""
    if not chunks:
        return np.zeros(0, dtype=np.float64)
    flat = np.concatenate([np.ascontiguousarray(c, dtype=np.complex128) for c in chunks])
    reals = flat.view(np.float64)
    if reals.size < length:
        raise ValueError(f"{reals.size} packed values cannot hold {length}")
    return reals[:length].copy()


class _Layout(Protocol):
    def select(self, patterns: Iterable[str]) -> np.ndarray: ...

    @property
    def size(self) -> int: ...


class Selection:
    """Which coordinates of a ``dimension``-vector are encrypted (the rest go in the clear)."""

    def __init__(self, encrypted: np.ndarray, dimension: int) -> None:
        index = np.asarray(encrypted, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= dimension
                           or np.any(np.diff(index) <= 0)):
            raise ValueError(f"encrypted indices must be strictly increasing in "
                             f"[0, {dimension}), got {index.size} indices")
        self.dimension = dimension
        self.encrypted = index
        mask = np.ones(dimension, dtype=bool)
        mask[index] = False
        self.clear = np.flatnonzero(mask)

    @classmethod
    def everything(cls, dimension: int) -> Selection:
        return cls(np.arange(dimension, dtype=np.int64), dimension)

    @classmethod
    def of_layers(cls, layout: _Layout, patterns: Iterable[str]) -> Selection:
        """Encrypt the parameters whose names match ``patterns`` (``Layout.select`` globs)."""
        return cls(layout.select(patterns), layout.size)

    @property
    def is_everything(self) -> bool:
        return self.clear.size == 0

    def split(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(encrypted part, clear part)`` of ``vector``."""
        if vector.shape != (self.dimension,):
            raise ValueError(f"vector has shape {vector.shape}, expected ({self.dimension},)")
        if self.is_everything:
            return vector, vector[:0]
        return vector[self.encrypted], vector[self.clear]

    def merge(self, encrypted: np.ndarray, clear: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`split` (float64)."""
        out = np.zeros(self.dimension, dtype=np.float64)
        out[self.encrypted] = encrypted
        out[self.clear] = clear
        return out
