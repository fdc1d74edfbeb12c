"""Shamir secret sharing of 256-bit secrets, limb by limb over GF(p), p = 2**31 - 1
(Shamir, CACM 1979).

A secret ``s < 2**256`` is written in base ``2**30``: ``s = sum_j s_j 2**(30 j)``, ``j < 9``
(``s_8 < 2**16``).  Every limb is a field element of GF(p), ``p = 2**31 - 1`` (a Mersenne
prime), and is shared with its own random polynomial

    f_j(x) = s_j + a_{j,1} x + ... + a_{j,t-1} x^{t-1}   over GF(p).

This is Shamir's scheme over the vector space GF(p)^9: share ``i`` is the vector
``(f_0(x_i), ..., f_8(x_i))`` at a distinct nonzero point ``x_i < p``.  Any ``t`` shares recover
each limb ``s_j = f_j(0)`` by Lagrange interpolation,
``s_j = sum_i y_ij * prod_{k != i} x_k / (x_k - x_i)``; ``t - 1`` shares are independent of
every limb (the nine polynomials are drawn independently, each uniform among those of
degree ``< t`` through its limb), hence of ``s``: the hiding is perfect, as over one large
field.  A reconstruction whose limbs are not those of a 256-bit number (a limb ``>= 2**30``,
the top one ``>= 2**16``) raises ``ValueError``.

On the wire a share is the nine values, limb 0 first, each 4 big-endian bytes
(:data:`SHARE_BYTES` = 36), and in code the integer those bytes spell.

Why this field: the shares of one secret at ``n`` points are a ``9 x n`` array of int64,
evaluated for all points and limbs at once as integer matrix products of the coefficients
with the public table of powers ``x^k mod p`` (values below ``2**31``, so products split in
half-words stay exact in int64).  Over the single 257-bit prime of earlier versions every
step cost ``2 n`` Python big-integer operations.

The coefficients are uniform in ``[0, p)`` by rejection from :func:`secrets.token_bytes`.
"""

from __future__ import annotations

import functools
import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["LIMBS", "PRIME", "SHARE_BYTES", "combine", "decode_share", "encode_share", "split",
           "split_many"]

PRIME = (1 << 31) - 1
LIMB_BITS = 30
LIMBS = 9  # 9 * 30 >= 256
SHARE_BYTES = 4 * LIMBS
_TOP_BITS = 256 - LIMB_BITS * (LIMBS - 1)
_POWER_ROWS = 1 << 15  # terms summed per reduction: 2**15 products below 2**47 fit int64
_CACHED_POWERS = 1 << 16  # values of a power table worth keeping (512 KiB)
_LAGRANGE_ROWS = 256  # rows of the (t x t) difference table handled at once
_SHARE = struct.Struct(f">{LIMBS}I")
_SPREAD = struct.Struct(">" + "4xQ" * LIMBS)  # one 96-bit slot per limb
_SLOTS = struct.Struct(">" + "IQ" * LIMBS)


def split(secret: int, *, threshold: int, xs: Sequence[int]) -> list[int]:
    """Shares, at the points ``xs``, of fresh random polynomials of degree ``t - 1``."""
    return split_many([secret], threshold=threshold, xs=xs)[0]


def split_many(secrets_: Sequence[int], *, threshold: int, xs: Sequence[int]
               ) -> list[list[int]]:
    """:func:`split` of several secrets at the same points (each with its own independent
    polynomials), in one evaluation: a SecAgg client shares ``b_u`` and ``s_u^SK`` together."""
    points = _checked(secrets_, threshold, xs)
    count = len(secrets_)
    shares = _evaluate(secrets_, _random_coefficients(count * (threshold - 1)), points)
    return [shares[i::count] for i in range(count)]


def _split_with(secret: int, coefficients: Sequence[Sequence[int]], xs: Sequence[int], *,
                threshold: int) -> list[int]:
    """Deterministic core of :func:`split`: ``coefficients[k - 1][j]`` is ``a_{j,k}``."""
    points = _checked([secret], threshold, xs)
    if len(coefficients) != threshold - 1 or any(len(row) != LIMBS for row in coefficients):
        raise ValueError(f"need {threshold - 1} rows of {LIMBS} coefficients")
    if any(not 0 <= a < PRIME for row in coefficients for a in row):
        raise ValueError("coefficients must be field elements")
    return _evaluate([secret], np.array(coefficients, np.int64).reshape(-1, LIMBS), points)


def _checked(secrets_: Sequence[int], threshold: int, xs: Sequence[int]) -> list[int]:
    if any(not 0 <= secret < 1 << 256 for secret in secrets_):
        raise ValueError("secret must be an integer in [0, 2**256)")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(xs) < threshold:
        raise ValueError(f"{len(xs)} parties cannot hold a {threshold}-of-n sharing")
    points = [int(x) for x in xs]
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct, nonzero and below p")
    return points


def _random_coefficients(count: int) -> np.ndarray:
    """``count x 9`` elements uniform in ``[0, p)``: 31 random bits each, ``p`` itself redrawn."""
    values = np.frombuffer(secrets.token_bytes(4 * count * LIMBS), "<u4") >> 1
    while (drawn_p := values == PRIME).any():  # probability 2**-31 each
        redraw = np.flatnonzero(drawn_p)
        values[redraw] = np.frombuffer(secrets.token_bytes(4 * redraw.size), "<u4") >> 1
    return values.astype(np.int64).reshape(count, LIMBS)


def _limbs(secret: int) -> list[int]:
    return [(secret >> (LIMB_BITS * j)) & ((1 << LIMB_BITS) - 1) for j in range(LIMBS)]


def _evaluate(secrets_: Sequence[int], coefficients: np.ndarray, points: list[int]) -> list[int]:
    """``f_j(x_i) = sum_k a_{j,k} x_i^k mod p`` for the nine limbs of every secret at every
    point at once, as two integer matrix products with the table of powers ``x_i^k mod p``
    (public, cached per points and degree).  Row ``k - 1`` of ``coefficients`` holds
    ``a_{j,k}`` of every secret in turn (``9 m`` values for ``m`` secrets); the shares come
    back point by point, secret by secret.

    Exact in int64: each coefficient is split into its high 15 and low 16 bits, so every
    product with a power (``< 2**31``) is below ``2**47``, and at most :data:`_POWER_ROWS`
    of them are summed before a reduction."""
    width = LIMBS * len(secrets_)
    table = np.empty((coefficients.size // width + 1, width), np.int64)
    table[0] = [limb for secret in secrets_ for limb in _limbs(secret)]  # a_{j,0} = s_j
    table[1:] = coefficients.reshape(-1, width)
    powers = _powers(tuple(points), table.shape[0])
    values = np.zeros((width, len(points)), np.int64)
    for start in range(0, table.shape[0], _POWER_ROWS):
        rows, power = table[start:start + _POWER_ROWS].T, powers[start:start + _POWER_ROWS]
        high = (rows >> 16) @ power
        high %= PRIME
        high <<= 16  # below 2**47
        low = (rows & 0xFFFF) @ power
        low %= PRIME
        values += high
        values += low
        values %= PRIME
    raw = values.T.astype(">u4").tobytes()
    return [int.from_bytes(raw[i:i + SHARE_BYTES], "big")
            for i in range(0, len(raw), SHARE_BYTES)]


def _powers(points: tuple[int, ...], count: int) -> np.ndarray:
    """``x_i^k mod p`` for ``k < count`` (rows) and each point (columns), read-only; cached
    up to :data:`_CACHED_POWERS` values a table (a neighbourhood's), so the cache stays
    below 256 x 512 KiB whatever sizes the sharings have."""
    if count * len(points) <= _CACHED_POWERS:
        return _cached_powers(points, count)
    return _power_table(points, count)


@functools.lru_cache(maxsize=256)
def _cached_powers(points: tuple[int, ...], count: int) -> np.ndarray:
    return _power_table(points, count)


def _power_table(points: tuple[int, ...], count: int) -> np.ndarray:
    x = np.array(points, np.int64)
    table = np.empty((count, len(points)), np.int64)
    table[0] = 1
    for k in range(1, count):
        np.multiply(table[k - 1], x, out=table[k])  # below 2**62
        np.remainder(table[k], PRIME, out=table[k])
    table.flags.writeable = False
    return table


def _share_limbs(shares: Sequence[int]) -> list[tuple[int, ...]]:
    """The nine limbs of each share; ``ValueError`` unless every limb is a field element."""
    try:
        rows = [_SHARE.unpack(y.to_bytes(SHARE_BYTES, "big")) for y in shares]
    except (OverflowError, AttributeError):
        raise ValueError("shares must be integers of 36 bytes") from None
    if any(max(row) >= PRIME for row in rows):
        raise ValueError("share is not a vector of field elements")
    return rows


def combine(shares: Mapping[int, int], *, threshold: int) -> int:
    """The secret from ``threshold`` shares ``{x: y}`` (extra shares are ignored).

    Raises ``ValueError`` with fewer than ``threshold`` shares, an invalid point or share, or
    limbs that are not those of a 256-bit secret; the caller turns that into
    :class:`~securefl.errors.ProtocolAbort`.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    chosen = sorted(shares.items())[:threshold]
    xs = tuple(x for x, _ in chosen)
    if any(not (isinstance(x, int) and 0 < x < PRIME) for x in xs):
        raise ValueError("shares must be at nonzero points below p")
    # sum_i w_i y_ij for all nine limbs at once: limb j of each share spread to bits
    # [96 j, 96 j + 96) of one integer, so that t products below 2**62 never carry between
    # slots (t < 2**34), then one multiply-add per share
    total = 0
    for weight, row in zip(_lagrange_at_zero(xs), _share_limbs([y for _, y in chosen]),
                           strict=True):
        total += weight * int.from_bytes(_SPREAD.pack(*reversed(row)), "big")
    slots = _SLOTS.unpack(total.to_bytes(_SLOTS.size, "big"))  # (high, low) pairs, top first
    values = [((slots[2 * (LIMBS - 1 - j)] << 64) | slots[2 * (LIMBS - 1 - j) + 1]) % PRIME
              for j in range(LIMBS)]
    if any(v >> LIMB_BITS for v in values) or values[-1] >> _TOP_BITS:
        raise ValueError("reconstructed value is not a 256-bit secret")
    return sum(v << (LIMB_BITS * j) for j, v in enumerate(values))


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """``prod_{j != i} x_j / (x_j - x_i) mod p`` for each ``i``.

    Public values only (the points), so they are cached: the neighbourhoods of one round
    mostly answer at the same points.  The products of each row of the difference table
    ``(x_j - x_i) mod p`` are taken pairwise (log-depth, products below ``2**62``).
    """
    points = np.array(xs, np.int64)
    numerator = 1
    for x in xs:
        numerator = numerator * x % PRIME
    weights = []
    for start in range(0, len(xs), _LAGRANGE_ROWS):
        rows = (points[None, :] - points[start:start + _LAGRANGE_ROWS, None]) % PRIME
        rows[np.arange(rows.shape[0]), np.arange(start, start + rows.shape[0])] = 1
        while rows.shape[1] > 1:
            if rows.shape[1] % 2:
                rows = np.concatenate([rows, np.ones((rows.shape[0], 1), np.int64)], axis=1)
            rows = rows[:, 0::2] * rows[:, 1::2] % PRIME
        for offset, denominator in enumerate(rows[:, 0].tolist()):
            inverse = pow(xs[start + offset] * denominator % PRIME, -1, PRIME)
            weights.append(numerator * inverse % PRIME)
    return tuple(weights)


def encode_share(value: int) -> bytes:
    """A share as 36 bytes: its nine limbs, 4 big-endian bytes each."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(raw: bytes) -> int:
    """Inverse of :func:`encode_share`; raises ``ValueError`` on a malformed share."""
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    if max(_SHARE.unpack(raw)) >= PRIME:
        raise ValueError("share is not a vector of field elements")
    return int.from_bytes(raw, "big")
