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

Blocks: a request reads one keystream in blocks of ``B`` candidates (at most
:data:`_BLOCK`, so that a block's buffers stay in the core's cache: every vectorised step
of a block runs on data already there), in place into buffers allocated once per request.
Block by block, its ``2 B`` words give the ``B`` values of ``U`` (the first ``B``) and of
``V`` (the next ``B``), and its accepted candidates, in order, are the next samples (the
last block's surplus is dropped), so the output is a deterministic function of the
keystream, as :meth:`~securefl.privacy.randomness.SecureRandom.seeded`'s regeneration needs.

Timing: every block runs the same steps on all of its candidates, the exact test on a
fixed number of them and ``gammaln`` on a fixed number of far ones (:class:`_Ptrs`), so a
block's work does not depend on the values.
The number of blocks depends on how many candidates are accepted, and given which
candidates are accepted the accepted values are independent and exactly Poisson, so the
time taken reveals nothing about the noise values; it varies, from run to run, with the
number of blocks alone.  (Not counted: the individual float instructions' timing, which
is not data-independent on every CPU, and an overflow of the exact test's fixed sizes,
probability below ``10^-23`` per block.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from scipy.special import gammaln

from securefl.privacy.randomness import SecureRandom

__all__ = ["poisson", "skellam"]

_PTRS_MIN = 10.0
_FAR = 64  # candidates per chunk of the exact test's gammaln fallback (class _Ptrs)
_BLOCK = 1 << 15  # most PTRS candidates per block: its buffers (1 MiB) stay in the L2 cache


def _inversion(lam: float, count: int, source: SecureRandom) -> np.ndarray:
    cdf, term, k = [], math.exp(-lam), 0
    total = 0.0
    while 1.0 - total > 2.0 ** -60 and k < 200:
        total += term
        cdf.append(total)
        k += 1
        term *= lam / k
    return np.searchsorted(np.asarray(cdf), source.uniform(count), side="right").astype(np.int64)


def _block_size(total: int) -> int:
    """``B``: :data:`_BLOCK`, or for a small request a multiple of 64 above ``1.25 total +
    64`` (one block then almost always suffices)."""
    return min(_BLOCK, -(-(total + total // 4 + 64) // 64) * 64)


class _Ptrs:
    """PTRS's constants for one ``lam`` (module docstring), and the exact test's fixed sizes.

    * ``width``: the squeeze fails with probability ``f = 0.14 + 0.86 (1 - v_r)`` per
      candidate, and every block runs the exact test on ``f B + 10 sqrt(B f (1 - f))``
      candidates, the ones that failed padded with repeats of one of them (a repeat has the
      same result), so a block's work does not depend on how many failed; ten standard
      deviations are exceeded with probability below ``10^-23`` per block, and then the test
      runs on a second ``width`` (the time shows that event, not the values).
    * ``log k!`` is read from a table of ``gammaln(k + 1)`` (the same float64 values) over
      ``lam + 0.43 +- R``, ``R = (2 a / 0.013 + b) / 2 + 2``, which holds every candidate
      with ``u_s >= 0.013`` (``|k - lam - 0.43| <= (2 a / u_s + b) |U|`` and ``|U| <=
      1/2``); of the others only those with ``V <= u_s`` reach the comparison
      (probability ``0.013^2`` per candidate), and ``gammaln`` evaluates them in chunks of
      :data:`_FAR`, one chunk per block unless more than 64 reach it (probability below
      ``10^-40`` per block of at most 32768).  Past ``R = 2^15`` (``lam`` above about
      ``3 10^7``) there is no table: ``gammaln`` on every candidate tested."""

    def __init__(self, lam: float, block: int) -> None:
        self.lam, self.log_lam = lam, math.log(lam)
        self.b = 0.931 + 2.53 * math.sqrt(lam)
        self.a = -0.059 + 0.02483 * self.b
        self.log_alpha = math.log(1.1239 + 1.1328 / (self.b - 3.4))
        self.v_r = 0.9277 - 3.6224 / (self.b - 2)
        fail = 0.14 + 0.86 * (1 - self.v_r)
        self.width = min(block, math.ceil(block * fail
                                          + 10 * math.sqrt(block * fail * (1 - fail))))
        reach = (2 * self.a / 0.013 + self.b) / 2 + 2
        self.low = float(max(0, math.floor(lam + 0.43 - reach)))
        self.table = (gammaln(np.arange(self.low, math.ceil(lam + 0.43 + reach)) + 1)
                      if reach <= 1 << 15 else None)

    def exact(self, k: np.ndarray, u_s: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The exact test of candidates that failed the squeeze: ``k >= 0``, not (``u_s <
        0.013`` and ``V > u_s``), and the comparison of log densities."""
        possible = (k >= 0) & ~((u_s < 0.013) & (v > u_s))
        with np.errstate(divide="ignore", invalid="ignore"):
            lhs = np.log(v) + self.log_alpha - np.log(self.a / (u_s * u_s) + self.b)
            rhs = k * self.log_lam - self.lam
            rhs -= self._log_factorial(k, possible)
        possible &= u_s > 0
        possible &= lhs <= rhs
        return possible

    def _log_factorial(self, k: np.ndarray, needed: np.ndarray) -> np.ndarray:
        """``gammaln(k + 1)`` wherever ``needed`` (anything elsewhere)."""
        if self.table is None:
            return gammaln(np.maximum(k, 0) + 1)
        offset = k - self.low
        outside = (offset < 0) | (offset >= self.table.size)
        np.clip(offset, 0, self.table.size - 1, out=offset)
        values = self.table[offset.astype(np.intp)]
        far = np.flatnonzero(outside & needed)
        chunk = np.zeros(_FAR, np.intp)
        for start in range(0, max(far.size, 1), _FAR):
            part = far[start:start + _FAR]
            chunk[:part.size] = part
            chunk[part.size:] = part[0] if part.size else 0
            values[chunk] = gammaln(np.maximum(k[chunk], 0) + 1)
        return values


def _ptrs(lam: float, total: int, source: SecureRandom) -> Iterator[np.ndarray]:
    """``total`` PTRS draws of one keystream, block by block (module docstring), as int64
    arrays of the accepted candidates in order."""
    block = _block_size(total)
    ptrs, stream = _Ptrs(lam, block), source.stream()
    u_s, k = np.empty(block), np.empty(block)
    accept, spare = np.empty(block, bool), np.empty(block, bool)
    chosen = np.zeros(ptrs.width, np.intp)
    # a candidate is accepted with probability at least 0.75 for lam >= 10 (measured: 0.753
    # at lam = 10, rising to 0.89): a block of B >= 128 accepts fewer than B / 2 with
    # probability below 2^-26, so the last of these blocks is never reached (p < 2^-1000)
    # V <= v_r iff j <= floor(v_r 2^53) iff the word is below (floor(v_r 2^53) + 1) 2^11
    v_words = np.uint64((math.floor(ptrs.v_r * 2.0 ** 53) + 1) << 11)
    for _ in range(2 * total // block + 64):
        words = stream.words(2 * block)
        u_words, v_of = words[:block], words[block:]
        np.right_shift(u_words, np.uint64(11), out=u_words)  # 53-bit integers j: u = j 2^-53
        ints = u_words.view(np.int64)
        ints -= 1 << 52
        big_u = np.multiply(ints, 2.0 ** -53, out=u_words.view(np.float64))  # U = u - 1/2
        np.abs(big_u, out=u_s)
        np.subtract(0.5, u_s, out=u_s)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(2 * ptrs.a, u_s, out=k)
            k += ptrs.b
            k *= big_u
            k += lam + 0.43
            np.floor(k, out=k)
        # the squeeze: accept at once if u_s >= 0.07 and V <= v_r
        np.greater_equal(u_s, 0.07, out=accept)
        np.less(v_of, v_words, out=spare)
        accept &= spare
        np.logical_not(accept, out=spare)
        failed = np.flatnonzero(spare)
        for start in range(0, max(failed.size, 1), ptrs.width):
            part = failed[start:start + ptrs.width]
            chosen[:part.size] = part
            chosen[part.size:] = part[0] if part.size else 0  # repeats: the same result
            v = (v_of[chosen] >> np.uint64(11)).view(np.int64) * 2.0 ** -53
            passed = ptrs.exact(k[chosen], u_s[chosen], v)
            if part.size:
                accept[chosen] = passed
        taken = k[accept][:total].astype(np.int64)
        yield taken
        total -= taken.size
        if total == 0:
            return
    raise RuntimeError("Poisson sampler: rejection did not finish")  # see the bound above


def _draws(lam: float, total: int, source: SecureRandom) -> Iterator[np.ndarray]:
    """``total`` draws of ``Poisson(lam)`` from one request, in order, in int64 pieces."""
    if lam == 0 or total == 0:
        yield np.zeros(total, np.int64)
    elif lam >= _PTRS_MIN:
        yield from _ptrs(lam, total, source)
    else:
        yield _inversion(lam, total, source)


def poisson(lam: float, count: int, *, source: SecureRandom) -> np.ndarray:
    """``count`` independent draws of ``Poisson(lam)`` (int64)."""
    _check(lam, count)
    out, at = np.empty(count, np.int64), 0
    for piece in _draws(lam, count, source):
        out[at:at + piece.size] = piece
        at += piece.size
    return out


def skellam(variance: float, count: int, *, source: SecureRandom,
            add_to: np.ndarray | None = None) -> np.ndarray:
    """``count`` draws of ``Sk(mu) = Poisson(mu / 2) - Poisson(mu / 2)`` (variance ``mu``):
    the first ``count`` of ``2 count`` Poisson draws of one request less the last ``count``.
    With ``add_to`` (int64, ``count`` long) they are added into it, which is returned: a
    site's noise goes straight into its rounded update, no vector of its own."""
    _check(variance / 2, count)
    if add_to is None:
        add_to = np.zeros(count, np.int64)
    elif add_to.shape != (count,) or add_to.dtype != np.int64:
        raise ValueError(f"add_to must be int64 of shape ({count},)")
    at = 0
    for piece in _draws(variance / 2, 2 * count, source):
        if at < count:  # the positive half, then what is left of the piece is negative
            plus = piece[:count - at]
            add_to[at:at + plus.size] += plus
            at, piece = at + plus.size, piece[plus.size:]
        add_to[at - count:at - count + piece.size] -= piece
        at += piece.size
    return add_to


def _check(lam: float, count: int) -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
