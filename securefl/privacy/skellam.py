"""Analysis of the distributed Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021).

Notation (integer units, after scaling by ``s``): ``Sk(mu)`` is the symmetric Skellam
distribution of variance ``mu``, ``Poisson(mu / 2) - Poisson(mu / 2)``.  It is closed under
summation: ``n`` independent shares ``Sk(mu / n)`` sum to exactly ``Sk(mu)``, so ``n`` sites
that each add a share before secure aggregation release the same sum as one trusted party
adding ``Sk(mu)`` (no approximation, unlike sums of discrete Gaussians).

* :func:`skellam_rdp`: the paper's RDP theorem, the one formula of this module.
* :func:`rounded_l2_bound` / :func:`rounded_l1_bound`: the sensitivities after conditional
  randomized rounding (Kairouz, Liu and Steinke, ICML 2021, Theorem 4.1 / Lemma 4.2 there;
  reused by Agarwal et al., section 4).
* :func:`epsilon_of_rdp`: Opacus's RDP -> (epsilon, delta) conversion (no formula here).
* :func:`calibrate_variance`, :func:`overflow_bound`, :func:`choose_scale`: how
  :mod:`securefl.privacy.distributed` picks ``mu`` and ``s`` from the config.

Modular wrap-around is post-processing of the noisy sum (the server sees
``(sum_i x_i + Sk(mu)) mod 2^b``, a function of the noisy sum), so it costs no privacy; it
costs accuracy when a coordinate wraps, which :func:`overflow_bound` bounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from securefl.errors import ConfigError

__all__ = [
    "ORDERS",
    "ROUNDING_BETA",
    "calibrate_variance",
    "choose_scale",
    "epsilon_of_rdp",
    "overflow_bound",
    "rounded_l1_bound",
    "rounded_l2_bound",
    "skellam_rdp",
]

#: Opacus's default RDP orders (fractional ones are bounded by the next integer order)
ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
#: beta of conditional randomized rounding: a rounding is redrawn while its norm exceeds
#: the bound; beta = exp(-1/2) is the papers' choice (about 1.6 draws on average at most)
ROUNDING_BETA = math.exp(-0.5)


def skellam_rdp(orders: Sequence[float], *, variance: float, l1: float, l2: float) -> np.ndarray:
    """RDP of the Skellam mechanism ``x -> x + Sk(mu)^d`` (Agarwal, Kairouz and Liu, NeurIPS
    2021, Theorem 3.5 in the variance parametrisation ``Sk(mu) = Poisson(mu/2) -
    Poisson(mu/2)``): for integer ``alpha > 1``, integer-valued queries of L1 and L2
    sensitivity ``Delta_1`` and ``Delta_2``,

        eps(alpha) <= alpha Delta_2^2 / (2 mu)
                      + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),
                             3 Delta_1 / (2 mu) ).

    The first term is the Gaussian mechanism's RDP at variance ``mu``; the second is the
    price of discreteness, vanishing as ``mu`` grows.  For a fractional order the bound at
    ``ceil(alpha)`` is returned: Renyi divergence is non-decreasing in its order (van Erven
    and Harremoes, IEEE Trans. Inf. Theory 2014, Theorem 3), so it is valid there too.
    """
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be finite and > 0, got {variance}")
    if not (l1 >= 0 and l2 >= 0 and math.isfinite(l1) and math.isfinite(l2)):
        raise ValueError(f"sensitivities must be finite and >= 0, got {l1}, {l2}")
    alpha = np.ceil(np.asarray(orders, dtype=np.float64))
    if (alpha < 2).any():
        raise ValueError("RDP orders must be > 1")
    gaussian = alpha * l2 ** 2 / (2 * variance)
    discrete = np.minimum(((2 * alpha - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                          3 * l1 / (2 * variance))
    return gaussian + discrete


def rounded_l2_bound(norm: float, *, dimension: int, beta: float = ROUNDING_BETA) -> float:
    """L2 bound after conditional randomized rounding of a vector of norm ``c`` in ``d``
    coordinates (Kairouz, Liu and Steinke, ICML 2021, Theorem 4.1 with the rounding redrawn
    until the bound holds):

        Delta_2^2 = min( (c + sqrt(d))^2,
                         c^2 + d / 4 + sqrt(2 ln(1 / beta)) (c + sqrt(d) / 2) ).
    """
    if norm < 0 or dimension < 1 or not 0 < beta < 1:
        raise ValueError("need norm >= 0, dimension >= 1 and 0 < beta < 1")
    root = math.sqrt(dimension)
    squared = min((norm + root) ** 2,
                  norm ** 2 + dimension / 4 + math.sqrt(2 * math.log(1 / beta))
                  * (norm + root / 2))
    return math.sqrt(squared)


def rounded_l1_bound(l2: float, *, dimension: int) -> float:
    """``Delta_1 <= min(Delta_2^2, sqrt(d) Delta_2)`` for integer vectors: every non-zero
    coordinate has ``|x_j| <= x_j^2``, and Cauchy-Schwarz gives the second term."""
    return min(l2 ** 2, math.sqrt(dimension) * l2)


def epsilon_of_rdp(rdp: np.ndarray, *, delta: float,
                   orders: Sequence[float] = ORDERS) -> float:
    """Epsilon at ``delta`` of an RDP curve, by Opacus's conversion (Balle et al. 2020)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        value, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp),
                                                  delta=delta)
    return float(value) if math.isfinite(value) and value >= 0 else math.inf


def _sensitivities(scaled_norm: float, dimension: int) -> tuple[float, float]:
    l2 = rounded_l2_bound(scaled_norm, dimension=dimension)
    return rounded_l1_bound(l2, dimension=dimension), l2


def calibrate_variance(*, target_epsilon: float, delta: float, steps: int,
                       scaled_norm: float, dimension: int) -> float:
    """The smallest aggregate variance ``mu`` (relative tolerance 1e-4, by bisection) with
    which ``steps`` releases of the Skellam mechanism, at the sensitivities of
    :func:`rounded_l2_bound` for ``c = scaled_norm``, spend at most ``target_epsilon``."""
    l1, l2 = _sensitivities(scaled_norm, dimension)

    def spent(mu: float) -> float:
        return epsilon_of_rdp(steps * skellam_rdp(ORDERS, variance=mu, l1=l1, l2=l2),
                              delta=delta)

    low, high = 1e-6 * l2 ** 2, l2 ** 2
    while spent(high) > target_epsilon:
        low, high = high, high * 4
        if high > 1e12 * l2 ** 2:
            raise ConfigError(f"[privacy] target_epsilon {target_epsilon} cannot be reached "
                              f"at delta {delta} over {steps} rounds")
    while high / low > 1 + 1e-4:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= target_epsilon else (middle, high)
    return high


def _skellam_tail(threshold: float, variance: float) -> float:
    """``P(|Sk(mu)| >= a) <= 2 exp(mu (cosh t - 1) - t a)`` at ``t = asinh(a / mu)``
    (Chernoff; ``E exp(t Sk(mu)) = exp(mu (cosh t - 1))``)."""
    t = math.asinh(threshold / variance)
    return min(1.0, 2 * math.exp(variance * (math.cosh(t) - 1) - t * threshold))


def overflow_bound(*, scale: float, clip_norm: float, cohort: int, variance: float,
                   dimension: int, smallest_block: int, bits: int) -> float:
    """Union bound on the probability that some coordinate of the round's noisy sum leaves
    ``[-2^(b-1), 2^(b-1))`` and wraps.

    Per coordinate, the sum of ``n`` rounded, rotated updates is the rotated sum ``v`` of
    the scaled updates (``||v|| <= n s C``, all updates aligned) plus ``n`` rounding errors
    below 1 each; a coordinate of a randomized Hadamard rotation of a block of size ``B``
    is sub-Gaussian, ``P(|(H D v)_j| >= t) <= 2 exp(-t^2 B / (2 ||v||^2))`` (Hoeffding over
    the random signs).  Half of the headroom goes to the signal and half to the noise
    (:func:`_skellam_tail`); the result is multiplied by ``d``.
    """
    half = 2.0 ** (bits - 1) - cohort
    if half <= 0:
        return 1.0
    norm = cohort * scale * clip_norm
    signal = 2 * math.exp(-(half / 2) ** 2 * smallest_block / (2 * norm ** 2)) if norm else 0.0
    return min(1.0, dimension * (signal + _skellam_tail(half / 2, variance)))


def choose_scale(*, target_epsilon: float, delta: float, steps: int, clip_norm: float,
                 cohort: int, dimension: int, smallest_block: int, bits: int,
                 overflow: float) -> tuple[float, float]:
    """``(s, mu)``: the largest scale ``s`` (finest resolution) whose calibrated ``mu``
    keeps :func:`overflow_bound` at most ``overflow`` (bisection on ``log s``)."""
    def variance(scale: float) -> float:
        return calibrate_variance(target_epsilon=target_epsilon, delta=delta, steps=steps,
                                  scaled_norm=scale * clip_norm, dimension=dimension)

    def fits(scale: float) -> bool:
        return overflow_bound(scale=scale, clip_norm=clip_norm, cohort=cohort,
                              variance=variance(scale), dimension=dimension,
                              smallest_block=smallest_block, bits=bits) <= overflow

    low, high = 1e-3 / clip_norm, 2.0 ** bits / clip_norm
    if not fits(low):
        raise ConfigError(f"[privacy] bits = {bits} leaves no room for {cohort} clients' "
                          f"noisy sum in {dimension} coordinates without overflow; raise bits")
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, variance(low)
