"""Noise-multiplier calibration: the sigma at which Opacus's accountant spends the budget.

Opacus's ``get_noise_multiplier`` bisects sigma with one full RDP curve per candidate: about
thirteen curves, each over the accountant's 150 orders, most of them fractional (a series of
``erfc`` terms per order, longest at small orders and small sigma).  For the RDP accountant
this module finds a sigma with the same contract, ``target - tolerance <= epsilon(sigma) <=
target`` (Opacus's ``epsilon_tolerance``, 0.01), from far fewer terms:

1. **coarse**: solve on a subset of the accountant's integer orders.  ``epsilon`` over a
   subset of orders is ``min`` over fewer conversions (Balle et al., AISTATS 2020, thm. 21),
   so it bounds the accountant's epsilon from above, and it decreases in sigma;
2. **refine** on the accountant's orders between the two coarse orders next to the coarse
   optimum (fractional ones included), where the optimal order lies;
3. **verify** with the full curve at the refined sigma: its epsilon (what
   :func:`~securefl.privacy.accounting.epsilon` and the ledger compute, bit for bit
   Opacus's :class:`~opacus.accountants.RDPAccountant`) must meet the contract; else the
   refinement repeats on the orders next to the full curve's optimal order (at most
   :data:`_WINDOWS` tries), and as a last resort Opacus's own ``get_noise_multiplier``
   decides.

Each 1-d solve is regula falsi (Illinois) on ``log epsilon`` against ``log sigma`` inside a
bracket that always holds the answer, with a bisection step whenever interpolation stalls.
Every epsilon comes from ``opacus.accountants.analysis.rdp`` (``compute_rdp``,
``get_privacy_spent``); no formula is written here.  The full curves are cached per
``(q, sigma)`` (:func:`~securefl.privacy.accounting.rdp_per_step`), so the ledger's first
charge reuses the verification's curve.  The PRV accountant keeps Opacus's search.

Under public sampling (``q = 1`` per round taken part in) the steps are the rounds a client
is calibrated to take part in, :func:`calibrated_participations`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from securefl.errors import ConfigError
from securefl.privacy.accounting import AccountantName, rdp_per_step

__all__ = ["EPSILON_TOLERANCE", "PARTICIPATION_QUANTILE", "calibrate_noise_multiplier",
           "calibrated_participations"]

#: Opacus's ``get_noise_multiplier`` default ``epsilon_tolerance``
EPSILON_TOLERANCE = 0.01
#: distributed DP's default quantile of a site's participations (``[privacy]
#: participation_quantile``): a site runs out of budget before the last round w.p. <= 1e-3
PARTICIPATION_QUANTILE = 0.999
_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: integer orders of the accountant (cheap: a finite binomial sum each), sparser when large
_COARSE = tuple(a for a in _ORDERS if float(a).is_integer()
                and (a <= 16 or a in (20, 24, 28, 32, 40, 48, 56, 63)))
_HALF_WINDOW = 3  # orders on either side of the optimal one
_WINDOWS = 3
_MAX_EVALUATIONS = 100

Spent = Callable[[float], tuple[float, float]]  # sigma -> (epsilon, optimal order)


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: AccountantName = "rdp") -> float:
    """A sigma with ``target - 0.01 <= epsilon((sigma, q, steps), delta) <= target`` under
    ``accountant`` (Opacus's ``get_noise_multiplier`` contract; see the module docstring).

    Cached: the search is pure, and clients whose ``(q, steps)`` agree share it."""
    if target_epsilon <= 0:
        raise ConfigError(f"[privacy] target_epsilon must be > 0, got {target_epsilon}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest"
            if accountant == "rdp":
                return _calibrate_rdp(float(target_epsilon), float(delta), float(sample_rate),
                                      int(steps))
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))
    except ValueError as exc:
        raise ConfigError(f"[privacy] target_epsilon {target_epsilon} cannot be reached at "
                          f"delta {delta} over {steps} steps at sample rate {sample_rate:.4g} "
                          f"({exc}); raise the budget or train fewer steps") from None


def calibrated_participations(*, rounds: int, rate: float, quantile: float | None) -> int:
    """The rounds ``k`` a client's noise is calibrated for under public sampling (``q = 1``
    per round taken part in, ``k`` such rounds spend ``target_epsilon``).

    Every round samples ``m`` of the ``N`` clients afresh, so a client's number of rounds is
    ``K ~ Binomial(R, m / N)`` (``rate = m / N``).  ``quantile = None``: ``k = ceil(R m /
    N)``, the expected number (a client drawn more often declines once its ledger is full:
    about 4 in 10 clients at ``R = 30``, ``m / N = 0.2``).  ``quantile = p``: the smallest
    ``k`` with ``P(K > k) <= 1 - p``, so a client runs out before the last round with
    probability at most ``1 - p``.  The price is noise: at fixed epsilon the Gaussian's RDP
    ``k alpha / (2 z^2)`` makes ``z`` grow as ``sqrt(k)``, by ``sqrt(k / ceil(R m / N))``
    (``sqrt(13 / 6) = 1.47`` at ``R = 30``, ``m / N = 0.2``, ``p = 0.999``).  The ledger
    still charges the rounds actually taken and refuses one past the budget."""
    if rounds < 1 or not 0 < rate <= 1:
        raise ValueError(f"need rounds >= 1 and 0 < rate <= 1, got {rounds}, {rate}")
    expected = max(1, math.ceil(rate * rounds - 1e-9))
    if quantile is None:
        return expected
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    from scipy.stats import binom

    low, high = 0, rounds  # P(K > rounds) = 0: bisect on the decreasing tail P(K > k)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = ((low, middle) if float(binom.sf(middle, rounds, rate)) <= 1 - quantile
                     else (middle, high))
    return max(1, high)


def _calibrate_rdp(target: float, delta: float, q: float, steps: int) -> float:
    low = target - EPSILON_TOLERANCE

    def full(sigma: float) -> tuple[float, float]:
        return _spent(rdp_per_step(q, sigma) * steps, _ORDERS, delta)

    def on(orders: Sequence[float]) -> Spent:
        return lambda sigma: _spent(_curve(q, sigma, orders) * steps, orders, delta)

    sigma, order = _solve(on(_COARSE), target=target, low=low, start=1.0)
    window = _between_neighbours(order)
    for _ in range(_WINDOWS):
        # aim inside the band's upper half: the full curve can only lower the epsilon
        sigma, _ = _solve(on(window), target=target, low=target - EPSILON_TOLERANCE / 2,
                          start=sigma)
        spent, order = full(sigma)
        if low <= spent <= target:
            return sigma
        window = _window(order)
    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                      sample_rate=q, steps=steps, accountant="rdp",
                                      epsilon_tolerance=EPSILON_TOLERANCE))


def _curve(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                               orders=list(orders)))


def _spent(rdp: np.ndarray, orders: Sequence[float], delta: float) -> tuple[float, float]:
    eps, order = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), float(order)


def _between_neighbours(order: float) -> tuple[float, ...]:
    """The accountant's orders between the coarse orders next to ``order`` (where the optimal
    order lies when epsilon is unimodal in the order; the verification checks it)."""
    index = _COARSE.index(order)
    first, last = _COARSE[max(0, index - 1)], _COARSE[min(len(_COARSE) - 1, index + 1)]
    return tuple(a for a in _ORDERS if first <= a <= last)


def _window(order: float) -> tuple[float, ...]:
    """The accountant's orders within :data:`_HALF_WINDOW` places of ``order``."""
    index = _ORDERS.index(order) if order in _ORDERS else int(
        np.argmin([abs(a - order) for a in _ORDERS]))
    return _ORDERS[max(0, index - _HALF_WINDOW):index + _HALF_WINDOW + 1]


def _solve(spent: Spent, *, target: float, low: float, start: float) -> tuple[float, float]:
    """A sigma with ``low <= spent(sigma) <= target`` (``spent`` decreasing in sigma), and
    the optimal order there.

    Regula falsi (Illinois variant) on ``(log sigma, log epsilon)`` toward the band's middle,
    inside a bracket ``[below, above]`` with ``spent(below) > target >= spent(above)``;
    geometric bisection when a point is infinite or interpolation stalls.  ``ValueError``
    (Opacus's message) when no sigma up to Opacus's ``MAX_SIGMA`` reaches the target."""
    aim = math.log((low + target) / 2)
    below: tuple[float, float] | None = None  # (log sigma, log eps) with eps > target
    above: tuple[float, float] | None = None  # with eps <= target
    sigma, side = start, 0
    for _ in range(_MAX_EVALUATIONS):
        eps, order = spent(sigma)
        if low <= eps <= target:
            return sigma, order
        log_eps = math.log(eps) if 0 < eps < math.inf else (
            math.inf if eps > target else -math.inf)
        point = (math.log(sigma), log_eps)
        if eps > target:
            below = point
            if side == -1 and above is not None:  # Illinois: halve the stale end's weight
                above = (above[0], aim + (above[1] - aim) / 2)
            side = -1
        else:
            above = point
            if side == 1 and below is not None and math.isfinite(below[1]):
                below = (below[0], aim + (below[1] - aim) / 2)
            side = 1
        sigma = _next_sigma(below, above, aim, sigma, eps)
        if sigma > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    raise ValueError(f"no noise multiplier found in {_MAX_EVALUATIONS} evaluations")


def _next_sigma(below: tuple[float, float] | None, above: tuple[float, float] | None,
                aim: float, sigma: float, eps: float) -> float:
    if below is None or above is None:
        # not bracketed yet: step past the answer, twice as far as epsilon ~ 1 / sigma says
        ratio = eps / math.exp(aim) if 0 < eps < math.inf else 4.0
        factor = min(16.0, max(1.001, (ratio if ratio > 1 else 1 / ratio) ** 2))
        return sigma * factor if above is None else sigma / factor
    (x0, y0), (x1, y1) = below, above
    middle = (x0 + x1) / 2
    if not math.isfinite(y0) or y0 == y1:
        return math.exp(middle)
    x = x0 + (aim - y0) * (x1 - x0) / (y1 - y0)
    margin = (x1 - x0) / 64  # stay strictly inside the bracket
    if not x0 + margin <= x <= x1 - margin:
        x = middle
    return math.exp(x)
