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

``H_B`` is applied as a Kronecker product of Hadamard matrices of at most 16 rows
(``H_{2^a} (x) H_{2^b}``), one matrix product per factor: ``O(B log B)`` work in a few
passes over memory, between the block and one scratch buffer (nothing else of the
vector's size is allocated; the sign flips are one masked negation in place).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from securefl.secagg.prg import prg_words

__all__ = ["MAX_BLOCK", "MIN_BLOCK", "block_sizes", "padded_dimension", "rotate", "unrotate"]

MIN_BLOCK = 256
MAX_BLOCK = 1 << 20
_FACTOR_BITS = 4  # H_16 factors within a row: fewer flops than H_32
_ROW_BITS = 14


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


@functools.lru_cache(maxsize=16)
def _hadamard(size: int) -> np.ndarray:
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _walsh_hadamard(block: np.ndarray, scratch: np.ndarray, factor: float) -> None:
    """``block <- factor H_B block`` in place for ``B = 2^k``, ``scratch`` holding ``B``
    floats.  As an ``R x C`` matrix ``X`` (``C = 2^min(k, 14)`` columns, 128 KiB a row),
    ``H_B x = vec(H_R X H_C)`` (``H_B = H_R (x) H_C``, both symmetric): one product
    ``H_R X`` over memory into ``scratch`` (``R <= 64``), then each row's ``H_C`` while the
    row is in cache, back into ``block``: two passes over memory whatever ``B``."""
    columns = 1 << min(block.size.bit_length() - 1, _ROW_BITS)
    rows = block.size // columns
    if rows == 1:
        _factored(block, scratch[:block.size], factor)
        np.copyto(block, scratch[:block.size])
        return
    matrix, mixed = block.reshape(rows, columns), scratch[:block.size].reshape(rows, columns)
    np.matmul(_hadamard(rows) * factor, matrix, out=mixed)
    for row in range(rows):
        _factored(mixed[row], matrix[row], 1.0)


def _factored(source: np.ndarray, target: np.ndarray, factor: float) -> None:
    """``target <- factor H_C source`` (``source`` is overwritten) for ``C = 2^c``: ``c``
    split into factors of at most :data:`_FACTOR_BITS` bits; each product ``X^T H_f``
    applies ``H_f`` along one axis and moves it last, so after all the factors the axes are
    back in their original order.  The products alternate between the two buffers, and
    ``factor`` rides on the last one."""
    bits = source.size.bit_length() - 1
    factors = []
    while bits > 0:
        factors.append(min(_FACTOR_BITS, bits))
        bits -= factors[-1]
    into, out_of = target, source
    for index, bits in enumerate(factors):
        size = 1 << bits
        matrix = _hadamard(size) * factor if index == len(factors) - 1 else _hadamard(size)
        np.matmul(out_of.reshape(size, -1).T, matrix, out=into.reshape(-1, size))
        into, out_of = out_of, into
    if out_of is not target:
        np.copyto(target, out_of)


def _negated(seed: bytes, count: int) -> np.ndarray:
    """``D``'s diagonal as a mask: ``True`` where the sign is ``-1`` (a bit of the PRG)."""
    if len(seed) != 32:
        raise ValueError("the rotation seed is 32 bytes")
    words = prg_words(seed, b"securefl/privacy/rotation/v1", -(-count // 32))
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:count].view(bool)


def rotate(vector: np.ndarray, *, seed: bytes, scale: float = 1.0) -> np.ndarray:
    """``scale R x`` (float64, ``padded_dimension(d)`` coordinates) of a ``d``-vector."""
    dimension = vector.shape[0]
    padded = np.empty(padded_dimension(dimension), np.float64)
    padded[:dimension] = vector
    padded[dimension:] = 0.0
    np.negative(padded, out=padded, where=_negated(seed, padded.size))
    _blocks(padded, dimension, scale)
    return padded


def unrotate(rotated: np.ndarray, *, seed: bytes, dimension: int) -> np.ndarray:
    """``R^T y`` cut back to ``dimension`` coordinates (``H_B`` is symmetric, ``H_B^2 = B I``)."""
    if rotated.shape != (padded_dimension(dimension),):
        raise ValueError(f"expected {padded_dimension(dimension)} rotated coordinates, "
                         f"got {rotated.shape}")
    out = np.array(rotated, np.float64)
    _blocks(out, dimension, 1.0)
    np.negative(out, out=out, where=_negated(seed, out.size))
    return out[:dimension]


def _blocks(padded: np.ndarray, dimension: int, scale: float) -> None:
    """``H_B / sqrt(B)`` times ``scale`` on every block of ``padded``, in place."""
    sizes = block_sizes(dimension)
    scratch = np.empty(sizes[0], np.float64)
    start = 0
    for size in sizes:
        _walsh_hadamard(padded[start:start + size], scratch, scale / math.sqrt(size))
        start += size
