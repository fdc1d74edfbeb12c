"""Shamir secret sharing over the prime field GF(p), p = 2**256 + 297 (Shamir, CACM 1979).

A secret ``s < 2**256`` is the constant term of a random polynomial
``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` over GF(p); share ``i`` is ``(x_i, f(x_i))`` with
distinct nonzero ``x_i``.  Any ``t`` shares recover ``s = f(0)`` by Lagrange interpolation,
``s = sum_i y_i * prod_{j != i} x_j / (x_j - x_i)``; ``t - 1`` shares are independent of ``s``.
``p`` is the smallest prime above ``2**256``, so every 256-bit secret is a field element.

The coefficients come from :func:`secrets.randbelow`.  Evaluation is Horner's rule run for all
parties at once on a numpy object array of Python integers, reducing modulo ``p`` every 16 steps
(the ``x_i`` are small, so intermediate values stay short).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["PRIME", "SHARE_BYTES", "combine", "decode_share", "encode_share", "split"]

PRIME = (1 << 256) + 297
SHARE_BYTES = 33
_REDUCE_EVERY = 16
_SCALAR_PARTIES = 64


def split(secret: int, *, threshold: int, xs: Sequence[int]) -> list[int]:
    """Shares ``f(x)``, ``x`` in ``xs``, of a fresh random polynomial of degree ``t - 1``."""
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return _split_with(secret, coefficients, xs, threshold=threshold)


def _split_with(secret: int, coefficients: Sequence[int], xs: Sequence[int], *,
                threshold: int) -> list[int]:
    """Deterministic core of :func:`split`: ``coefficients`` are ``a_1 .. a_{t-1}``."""
    if not 0 <= secret < 1 << 256:
        raise ValueError("secret must be an integer in [0, 2**256)")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(coefficients) != threshold - 1:
        raise ValueError(f"need {threshold - 1} coefficients, got {len(coefficients)}")
    if any(not 0 <= a < PRIME for a in coefficients):
        raise ValueError("coefficients must be field elements")
    if len(xs) < threshold:
        raise ValueError(f"{len(xs)} parties cannot hold a {threshold}-of-n sharing")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    polynomial = [secret, *coefficients]
    if len(xs) <= _SCALAR_PARTIES:  # a neighbourhood: plain integers beat object arrays
        return [_horner(polynomial, int(x)) for x in xs]
    points = np.array([int(x) for x in xs], dtype=object)
    values = np.full(len(points), polynomial[-1], dtype=object)
    for step, coefficient in enumerate(reversed(polynomial[:-1]), start=1):
        values = values * points + coefficient
        if step % _REDUCE_EVERY == 0:
            values %= PRIME
    return [int(v) % PRIME for v in values]


def _horner(polynomial: Sequence[int], x: int) -> int:
    """``f(x) mod p`` for ``f = polynomial[0] + polynomial[1] X + ...``."""
    value = polynomial[-1]
    for step, coefficient in enumerate(reversed(polynomial[:-1]), start=1):
        value = value * x + coefficient
        if step % _REDUCE_EVERY == 0:
            value %= PRIME
    return value % PRIME


def combine(shares: Mapping[int, int], *, threshold: int) -> int:
    """The secret from ``threshold`` shares ``{x: y}`` (extra shares are ignored).

    Raises ``ValueError`` with fewer than ``threshold`` shares or an invalid point; the caller
    turns that into :class:`~securefl.errors.ProtocolAbort`.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    chosen = sorted(shares.items())[:threshold]
    xs = [x for x, _ in chosen]
    if any(not 0 < x < PRIME for x in xs) or any(not 0 <= y < PRIME for _, y in chosen):
        raise ValueError("shares must be field elements at nonzero points")
    secret = sum(y * weight for (_, y), weight in zip(chosen, _lagrange_at_zero(tuple(xs)),
                                                       strict=True))
    secret %= PRIME
    if secret >= 1 << 256:
        raise ValueError("reconstructed value is not a 256-bit secret")
    return secret


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """``prod_{j != i} x_j / (x_j - x_i) mod p`` for each ``i``.

    Public values only (the points), so they are cached: the neighbourhoods of one round
    mostly answer at the same points.
    """
    weights = []
    for i, x_i in enumerate(xs):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator *= x_j
                denominator *= x_j - x_i
        weights.append(numerator * pow(denominator % PRIME, -1, PRIME) % PRIME)
    return tuple(weights)


def encode_share(value: int) -> bytes:
    """A share value as 33 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(raw: bytes) -> int:
    """Inverse of :func:`encode_share`; raises ``ValueError`` on a malformed share."""
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise ValueError("share is not a field element")
    return value
