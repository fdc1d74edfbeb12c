"""Block-wise randomized Walsh-Hadamard rotation (Kairouz, Liu and Steinke, ICML 2021,
section 4; Agarwal, Kairouz and Liu, NeurIPS 2021, Algorithm 1).

A vector of ``d`` coordinates is zero-padded to ``D``, the next multiple of ``MIN_BLOCK``,
and cut into blocks whose sizes are the powers of two of ``D``'s binary expansion (largest
first, at most ``MAX_BLOCK``): no block is padded, so a model of ``d = 4810`` travels as
``4864`` words instead of the ``8192`` that padding to one power of two costs.  Each block
``x_B`` is rotated by

    R x_B = H_B D_B x_B / sqrt(B),

``H_B`` the Walsh-Hadamard matrix and ``D_B`` a diagonal of signs, one per padded
coordinate, from shared public randomness fixed per round (the caller's 32-byte ``seed``,
expanded by HKDF-SHA256 and AES-128-CTR, :func:`securefl.secagg.prg.prg_words`).  ``R`` is
orthogonal, so ``R^T R = I`` and ``||R x|| = ||x||``: the L2 sensitivity is unchanged, and a
coordinate of ``R x`` is sub-Gaussian with variance proxy ``||x_B||^2 / B`` over the signs
(what keeps the noisy sum inside the modulus, :func:`securefl.privacy.skellam.overflow_bound`).

``H_B`` is applied as a Kronecker product of Hadamard matrices of at most 32 rows
(``H_{2^a} (x) H_{2^b}``), one matrix product per factor: ``O(B log B)`` work in a few
passes over memory.
"""

from __future__ import annotations

import functools

import numpy as np

from securefl.secagg.prg import prg_words

__all__ = ["MAX_BLOCK", "MIN_BLOCK", "block_sizes", "padded_dimension", "rotate", "unrotate"]

MIN_BLOCK = 256
MAX_BLOCK = 1 << 20
_FACTOR_BITS = 5


def padded_dimension(dimension: int) -> int:
    """``D``: ``dimension`` rounded up to a multiple of :data:`MIN_BLOCK`."""
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    return -(-dimension // MIN_BLOCK) * MIN_BLOCK


@functools.lru_cache(maxsize=64)
def block_sizes(dimension: int) -> tuple[int, ...]:
    """Powers of two summing to :func:`padded_dimension`, largest first."""
    rest, sizes = padded_dimension(dimension), []
    while rest:
        size = min(MAX_BLOCK, 1 << (rest.bit_length() - 1))
        sizes.append(size)
        rest -= size
    return tuple(sizes)


@functools.lru_cache(maxsize=8)
def _hadamard(size: int) -> np.ndarray:
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _walsh_hadamard(block: np.ndarray) -> np.ndarray:
    """``H_B x`` for ``B = 2^k``: ``k`` split into factors of at most 5 bits; each product
    ``X^T H_f`` applies ``H_f`` along one axis and moves it last, so after all the factors
    the axes are back in their original order."""
    bits = block.size.bit_length() - 1
    factors = []
    while bits > 0:
        factors.append(min(_FACTOR_BITS, bits))
        bits -= factors[-1]
    out = block
    for factor in factors:
        size = 1 << factor
        out = out.reshape(size, -1).T @ _hadamard(size)
    return out.reshape(-1)


def _signs(seed: bytes, count: int) -> np.ndarray:
    if len(seed) != 32:
        raise ValueError("the rotation seed is 32 bytes")
    words = prg_words(seed, b"securefl/privacy/rotation/v1", -(-count // 32))
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:count]
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotate(vector: np.ndarray, *, seed: bytes) -> np.ndarray:
    """``R x`` (float64, ``padded_dimension(d)`` coordinates) of a ``d``-vector."""
    dimension = vector.shape[0]
    padded = np.zeros(padded_dimension(dimension), np.float64)
    padded[:dimension] = vector
    padded *= _signs(seed, padded.size)
    start = 0
    for size in block_sizes(dimension):
        padded[start:start + size] = _walsh_hadamard(padded[start:start + size]) / np.sqrt(size)
        start += size
    return padded


def unrotate(rotated: np.ndarray, *, seed: bytes, dimension: int) -> np.ndarray:
    """``R^T y`` cut back to ``dimension`` coordinates (``H_B`` is symmetric, ``H_B^2 = B I``)."""
    if rotated.shape != (padded_dimension(dimension),):
        raise ValueError(f"expected {padded_dimension(dimension)} rotated coordinates, "
                         f"got {rotated.shape}")
    out = np.empty(rotated.shape[0], np.float64)
    start = 0
    for size in block_sizes(dimension):
        out[start:start + size] = (_walsh_hadamard(np.asarray(rotated[start:start + size],
                                                              np.float64)) / np.sqrt(size))
        start += size
    out *= _signs(seed, out.size)
    return out[:dimension]
