"""Exact Poisson and Skellam sampling on CSPRNG uniforms (the sites' distributed-DP noise).

Every uniform comes from :class:`~securefl.privacy.randomness.SecureRandom` (AES-256-CTR
under a fresh ``os.urandom`` key per request; for distributed DP's removable excess noise,
:meth:`~securefl.privacy.randomness.SecureRandom.seeded`, the same cipher keyed by HKDF from
a fresh ``os.urandom`` seed that is revealed only to remove that noise), never from a
statistical generator.

* ``lam >= 10``: Hoermann's transformed rejection with squeeze, PTRS ("The transformed
  rejection method for generating Poisson random variables", Insurance: Mathematics and
  Economics 12, 1993).  Per candidate, with ``U ~ U(-1/2, 1/2)``, ``V ~ U(0, 1)``,
  ``u_s = 1/2 - |U|``, ``b = 0.931 + 2.53 sqrt(lam)``, ``a = -0.059 + 0.02483 b``:
  ``k = floor((2 a / u_s + b) U + lam + 0.43)``; accept at once if ``u_s >= 0.07`` and
  ``V <= 0.9277 - 3.6224 / (b - 2)``; reject if ``k < 0`` or (``u_s < 0.013`` and
  ``V > u_s``); otherwise accept iff
  ``log V + log(1.1239 + 1.1328 / (b - 3.4)) - log(a / u_s^2 + b) <= -lam + k log lam -
  log k!``.  The accepted ``k`` is exactly Poisson (up to float64 evaluation of that last
  test); about 1.1 candidates are drawn per sample.
* ``lam < 10``: inversion, ``k = #{j : F(j) <= u}`` on the float64 CDF table up to the
  point where the remaining mass is below ``2^-60``.

Timing: every step is vectorised over the whole request.  The number of rejection passes
depends on the uniforms only, and in rejection sampling the accepted value is independent
of the number of candidates drawn before it, so the time taken reveals nothing about the
noise values; it varies, from run to run, with that number alone.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from securefl.privacy.randomness import SecureRandom

__all__ = ["poisson", "skellam"]

_PTRS_MIN = 10.0
_MAX_PASSES = 64  # each pass accepts > 85% of what is left: 64 passes fail with p < 2^-170


def _inversion(lam: float, count: int, source: SecureRandom) -> np.ndarray:
    cdf, term, k = [], math.exp(-lam), 0
    total = 0.0
    while 1.0 - total > 2.0 ** -60 and k < 200:
        total += term
        cdf.append(total)
        k += 1
        term *= lam / k
    return np.searchsorted(np.asarray(cdf), source.uniform(count), side="right").astype(np.int64)


def _ptrs(lam: float, count: int, source: SecureRandom) -> np.ndarray:
    root, log_lam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * root
    a = -0.059 + 0.02483 * b
    log_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(count, np.int64)
    pending: np.ndarray | None = None  # None: every index (the first pass, without gathers)
    for _ in range(_MAX_PASSES):
        size = count if pending is None else pending.size
        if size == 0:
            return out
        u = source.uniform(2 * size)
        big_u, v = u[:size], u[size:]
        big_u -= 0.5
        u_s = np.abs(big_u)
        np.subtract(0.5, u_s, out=u_s)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.divide(2 * a, u_s)
            k += b
            k *= big_u
            k += lam + 0.43
            np.floor(k, out=k)
        # the squeeze: accept at once unless u_s < 0.07 or V > v_r (about 14% left)
        rejected = u_s < 0.07
        rejected |= v > v_r
        rest = np.flatnonzero(rejected)
        k_r, u_r, v_r_ = k[rest], u_s[rest], v[rest]
        possible = (k_r >= 0) & (u_r > 0) & ~((u_r < 0.013) & (v_r_ > u_r))
        with np.errstate(divide="ignore", invalid="ignore"):
            test = possible & (np.log(v_r_) + log_alpha - np.log(a / (u_r * u_r) + b)
                               <= -lam + k_r * log_lam - gammaln(np.maximum(k_r, 0) + 1))
        rejected[rest[test]] = False
        if pending is None:
            out[:] = k  # the rejected ones are overwritten by later passes
            pending = rest[~test]
        else:
            accepted = ~rejected
            out[pending[accepted]] = k[accepted]
            pending = pending[rejected]
    raise RuntimeError("Poisson sampler: rejection did not finish")  # probability < 2^-170


def poisson(lam: float, count: int, *, source: SecureRandom) -> np.ndarray:
    """``count`` independent draws of ``Poisson(lam)`` (int64)."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if lam == 0 or count == 0:
        return np.zeros(count, np.int64)
    return (_ptrs if lam >= _PTRS_MIN else _inversion)(lam, count, source)


def skellam(variance: float, count: int, *, source: SecureRandom) -> np.ndarray:
    """``count`` draws of ``Sk(mu) = Poisson(mu / 2) - Poisson(mu / 2)`` (variance ``mu``)."""
    both = poisson(variance / 2, 2 * count, source=source)
    return both[:count] - both[count:]
