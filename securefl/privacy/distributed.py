"""Distributed DP under secure aggregation: the distributed Skellam mechanism (Agarwal,
Kairouz and Liu, NeurIPS 2021, Algorithm 1), run by every site before SecAgg+ masking, with
removable excess noise (Jiang, Wang, Chen et al., "Dordis", EuroSys 2024, XNoise).

Per round, at each site ``i`` (:class:`SkellamEncoding`, the
:class:`~securefl.secagg.encoding.Encoding` its SecAgg+ client masks with):

1. clip: ``x_i <- x_i min(1, C / ||x_i||)`` (also done by the trainer; done again here, the
   last step before anything leaves, on the rotated vector, which has the same norm);
2. rotate and scale: ``y_i = s R x_i`` (:mod:`securefl.privacy.rotation`, signs from the
   round's public seed :func:`~securefl.secagg.encoding.shared_seed`), so ``||y_i|| <= s C``;
3. conditional randomized rounding: ``r_i = floor(y_i) + Bernoulli(y_i - floor(y_i))``,
   redrawn until ``||r_i|| <= Delta_2`` (:func:`~securefl.privacy.skellam.rounded_l2_bound`),
   uniforms from the CSPRNG;
4. noise share ``Sk(mu / (n_min - k))`` per coordinate (``n_min`` the minimum cohort, ``k``
   the tolerated colluding sites), split along the noise levels ``n_min = l_0 < l_1 < ... <
   l_r <= m`` (Skellam is closed under sums): a base ``Sk(mu / (l_r - k))`` from the CSPRNG
   (:func:`securefl.privacy.poisson.skellam`), never revealed, plus for ``j = 1..r`` an excess
   ``E_j ~ Sk(mu / (l_{j-1} - k) - mu / (l_j - k))`` drawn from the seeded stream
   (:meth:`~securefl.privacy.randomness.SecureRandom.seeded`) of a fresh 32-byte seed
   ``s_j``; the variances telescope to ``mu / (n_min - k)``, exactly the share without levels;
5. wrap into ``Z_{2^b}`` and mask (SecAgg+).

Removal: once the survivor set ``U3`` is fixed and verified (``t`` neighbour signatures on
it, the ReleaseLog's one reveal), a site of ``U3`` adds to its unmask reply the seeds of the
levels ``l_j <= |U3|`` (:meth:`SkellamEncoding.removable`), nothing else; the server
regenerates those ``E_j`` and subtracts them from the unmasked sum before decoding.  With
``u = |U3|`` survivors, ``J`` the highest level ``<= u``, and ``k`` shares known to the
adversary, the honest noise left is ``Sk((u - k) mu / (l_J - k))`` and ``(u - k) mu / (l_J
- k) >= mu``: the calibrated epsilon holds and the ledger charges the same event.  A site of
``U3`` that never answers leaves its excess in (more noise: accuracy only).  The seeds are
independent of the data, so the server learns noise components and nothing about the update.

The server unmasks ``sum_i r_i + Sk(mu') mod 2^b`` with ``mu' >= mu`` whenever at least
``n_min`` sites survive and at most ``k`` of them tell it their share, reads it as signed
integers, un-rotates, divides by ``s``, and divides by the expected cohort ``m`` (the fixed
denominator of DP-FedAvg, :class:`DistributedMean`) before the server optimizer.

The scale ``s`` and ``mu`` (:class:`SkellamPlan`) follow from the config alone, so every
site and the server compute the same ones: ``mu`` is the smallest variance whose RDP over
the calibrated rounds (the ``participation_quantile`` ``p`` of a site's participations, so a
site runs out of budget before the last round with probability at most ``1 - p``) meets
``target_epsilon`` (:func:`~securefl.privacy.skellam.calibrate_variance`), and ``s`` the
largest scale whose wrap-around probability bound stays below :data:`OVERFLOW`
(:func:`~securefl.privacy.skellam.choose_scale`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from securefl.config.privacy import noise_levels_problem
from securefl.engine.protection import Combined, Update, WeightedSum
from securefl.privacy.accounting import PrivacyEvent
from securefl.privacy.poisson import skellam
from securefl.privacy.randomness import SecureRandom
from securefl.privacy.rotation import block_sizes, padded_dimension, rotate, unrotate
from securefl.privacy.skellam import choose_scale, rounded_l1_bound, rounded_l2_bound
from securefl.secagg.encoding import reveal_problem, word_dtype

__all__ = ["OVERFLOW", "DistributedMean", "DistributedSettings", "SkellamEncoding",
           "SkellamPlan"]

#: the bound on the probability that a round's noisy sum wraps somewhere (accuracy only:
#: wrap-around is post-processing of the noisy sum and costs no privacy)
OVERFLOW = 1e-6
_ROUNDING_BLOCK = 1 << 15
_MAX_ROUNDINGS = 200  # each draw fails with probability <= beta = 0.61: 200 fail w.p. 2^-140


@dataclass(frozen=True)
class SkellamPlan:
    """The mechanism of one model size: ``s``, aggregate ``mu`` and the sensitivities in
    integer units (``Delta_2`` after conditional rounding, ``Delta_1 <= min(Delta_2^2,
    sqrt(D) Delta_2)``), over ``D`` rotated coordinates."""

    dimension: int
    padded: int
    scale: float
    variance: float
    l1: float
    l2: float
    shares: int  # n_min - k: the noise shares the adversary cannot subtract
    overflow: float
    #: the noise levels l_1 < ... < l_r above l_0 = n_min (empty: nothing removable)
    levels: tuple[int, ...] = ()
    colluding_sites: int = 0

    @property
    def share_variance(self) -> float:
        """Each site's ``Sk(mu / (n_min - k))``: base plus every excess component."""
        return self.variance / self.shares

    @property
    def base_variance(self) -> float:
        """The part never revealed: ``mu / (l_r - k)`` (``l_r = n_min`` without levels)."""
        top = self.levels[-1] if self.levels else self.shares + self.colluding_sites
        return self.variance / (top - self.colluding_sites)

    @property
    def excess_variances(self) -> tuple[float, ...]:
        """``mu / (l_{j-1} - k) - mu / (l_j - k)`` for ``j = 1..r``."""
        k, low = self.colluding_sites, self.shares + self.colluding_sites
        steps = itertools.pairwise((low, *self.levels))
        return tuple(self.variance / (a - k) - self.variance / (b - k) for a, b in steps)

    def released_variance(self, survivors: int) -> float:
        """The noise in the released sum of ``u`` survivors after removal: ``u mu / (l_J -
        k)``, ``l_J`` the highest level ``<= u`` (``l_0 = n_min``)."""
        top = (self.shares + self.colluding_sites,
               *self.levels)[_removable(self.levels, survivors)]
        return survivors * self.variance / (top - self.colluding_sites)

    def remaining_variance(self, survivors: int) -> float:
        """Less the ``k`` colluders' shares: ``(u - k) mu / (l_J - k) >= mu``."""
        return self.released_variance(survivors) * (1 - self.colluding_sites / survivors)

    def event(self) -> PrivacyEvent:
        """One round, as the ledger charges it: ``z = sqrt(mu) / Delta_2`` whatever the
        survivors and the levels removed (the honest noise left is always ``>= mu``)."""
        return PrivacyEvent("skellam", math.sqrt(self.variance) / self.l2, 1.0, 1,
                            l1_sensitivity=self.l1, l2_sensitivity=self.l2)


@dataclass(frozen=True)
class DistributedSettings:
    """What the config fixes; :meth:`plan` derives the rest for a model of ``d`` coordinates."""

    target_epsilon: float
    delta: float
    #: rounds a site is calibrated to take part in: a high quantile of its Binomial(rounds,
    #: m / N) participations (:func:`~securefl.privacy.calibration.calibrated_participations`)
    steps: int
    clip_norm: float
    bits: int
    expected_cohort: int
    min_cohort: int
    colluding_sites: int = 0
    #: ``l_1 < ... < l_r`` in ``(min_cohort, expected_cohort]``: survivor counts at which the
    #: excess noise of the levels at or below them is removed (empty: none)
    levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in [2, 32], got {self.bits}")
        if not 0 <= self.colluding_sites < self.min_cohort <= self.expected_cohort:
            raise ValueError("need 0 <= colluding_sites < min_cohort <= expected_cohort, got "
                             f"{self.colluding_sites}, {self.min_cohort}, "
                             f"{self.expected_cohort}")
        problem = noise_levels_problem(self.levels, low=self.min_cohort,
                                       high=self.expected_cohort)
        if problem is not None:
            raise ValueError(f"noise levels {problem}")

    def plan(self, dimension: int) -> SkellamPlan:
        return _plan(self, dimension)


def _removable(levels: tuple[int, ...], survivors: int) -> int:
    """``#{j : l_j <= |U3|}``: the levels whose excess a survivor set of that size removes."""
    return sum(level <= survivors for level in levels)


@functools.lru_cache(maxsize=16)
def _plan(settings: DistributedSettings, dimension: int) -> SkellamPlan:
    padded = padded_dimension(dimension)
    scale, variance = choose_scale(
        target_epsilon=settings.target_epsilon, delta=settings.delta, steps=settings.steps,
        clip_norm=settings.clip_norm, cohort=settings.expected_cohort, dimension=padded,
        smallest_block=block_sizes(dimension)[-1], bits=settings.bits, overflow=OVERFLOW)
    l2 = rounded_l2_bound(scale * settings.clip_norm, dimension=padded)
    return SkellamPlan(dimension=dimension, padded=padded, scale=scale, variance=variance,
                       l1=rounded_l1_bound(l2, dimension=padded), l2=l2,
                       shares=settings.min_cohort - settings.colluding_sites,
                       overflow=OVERFLOW, levels=settings.levels,
                       colluding_sites=settings.colluding_sites)


class SkellamEncoding:
    """Steps 1-5 of the module docstring as a SecAgg+ encoding (the same object on every
    side: its parameters are public; the noise and rounding come from ``source``)."""

    def __init__(self, settings: DistributedSettings, *,
                 source: SecureRandom | None = None) -> None:
        self.settings = settings
        self.bits = settings.bits
        self._dtype = word_dtype(settings.bits)
        self._source = source or SecureRandom()

    @property
    def agreed(self) -> dict[str, object]:
        """The settings every party must share; they enter the SecAgg+ federation id, so a
        site configured for another epsilon or minimum cohort cannot join the round."""
        return {"mechanism": "skellam/v1", **dataclasses.asdict(self.settings)}

    def words(self, dimension: int) -> int:
        return padded_dimension(dimension)

    def check_cohort(self, survivors: int) -> str | None:
        if survivors < self.settings.min_cohort:
            return (f"{survivors} survivors, below the minimum cohort "
                    f"{self.settings.min_cohort} that distributed DP's noise is calibrated for")
        return None

    def round_to_integers(self, rotated: np.ndarray, bound: float) -> np.ndarray:
        """Conditional randomized rounding: redraw ``floor(y) + [u < y - floor(y)]`` until its
        norm is at most ``bound`` (Kairouz, Liu and Steinke 2021, section 4.1).  With ``u =
        j 2^-53`` the test is ``j < (y - floor(y)) 2^53``, both sides exact in float64; the
        draws are successive pieces of one CSPRNG keystream, read :data:`_ROUNDING_BLOCK`
        coordinates at a time into cache-sized buffers (the squared norm, a sum of integers
        below ``2^53``, is exact in any order)."""
        out = np.empty(rotated.size, np.int64)
        block = min(_ROUNDING_BLOCK, rotated.size)
        floor, fraction, up = np.empty(block), np.empty(block), np.empty(block, bool)
        stream = self._source.stream()
        for _ in range(_MAX_ROUNDINGS):
            squared = 0.0
            for start in range(0, rotated.size, block):
                y = rotated[start:start + block]
                low, high, above = floor[:y.size], fraction[:y.size], up[:y.size]
                np.floor(y, out=low)
                np.subtract(y, low, out=high)
                high *= 2.0 ** 53
                words = stream.words(y.size)
                words >>= np.uint64(11)
                np.less(words, high, out=above)
                low += above
                squared += float(np.dot(low, low))
                out[start:start + y.size] = low
            if squared <= bound * bound:
                return out
        raise RuntimeError("conditional rounding did not meet its norm bound")

    def integers(self, delta: np.ndarray, *, seed: bytes) -> np.ndarray:
        """Steps 1-3: the clipped, rotated, scaled update rounded to integers (norm <=
        Delta_2).  The clip is applied after the rotation, to ``s R x`` at ``s C``: ``R`` is
        orthogonal, so ``||s R x|| = s ||x||`` and ``min(1, s C / ||s R x||) s R x = s R
        (x min(1, C / ||x||))``."""
        return self.round_to_integers(self.rotated(delta, seed=seed),
                                      self.settings.plan(delta.shape[0]).l2)

    def rotated(self, delta: np.ndarray, *, seed: bytes) -> np.ndarray:
        """Steps 1-2: ``s R x`` clipped at ``s C`` (:meth:`integers`)."""
        if delta.ndim != 1 or not np.isfinite(delta).all():
            raise ValueError("update must be a finite 1-d vector")
        plan = self.settings.plan(delta.shape[0])
        rotated = rotate(delta, seed=seed, scale=plan.scale)
        norm, most = float(np.linalg.norm(rotated)), plan.scale * self.settings.clip_norm
        if norm > most:
            rotated *= most / norm
        return rotated

    def noise_share(self, dimension: int, *, add_to: np.ndarray | None = None
                    ) -> tuple[np.ndarray, tuple[bytes, ...]]:
        """Step 4: this site's ``Sk(mu / (n_min - k))`` for every rotated coordinate, as the
        CSPRNG base ``Sk(mu / (l_r - k))`` plus each level's excess ``E_j``, and the fresh
        seeds ``s_j`` (``os.urandom``) the excess components are drawn from.  With ``add_to``
        (int64, one per rotated coordinate: the rounded update) the share is added into it."""
        plan = self.settings.plan(dimension)
        noise = skellam(plan.base_variance, plan.padded, source=self._source, add_to=add_to)
        seeds = tuple(self._source.seed() for _ in plan.excess_variances)
        for level, level_seed in enumerate(seeds):
            self.excess(dimension, level=level, seed=level_seed, add_to=noise)
        return noise, seeds

    def excess(self, dimension: int, *, level: int, seed: bytes,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """``E_{level + 1}`` regenerated from its seed (added into ``add_to`` if given): the
        site draws it, the server subtracts it once the seed is revealed."""
        plan = self.settings.plan(dimension)
        return skellam(plan.excess_variances[level], plan.padded,
                       source=SecureRandom.seeded(seed), add_to=add_to)

    def removable(self, survivors: int) -> int:
        """How many excess seeds a site reveals for ``|U3| = survivors`` (levels ``<= |U3|``)."""
        return _removable(self.settings.levels, survivors)

    def encode(self, update: Update, *, seed: bytes) -> tuple[np.ndarray, tuple[bytes, ...]]:
        """Steps 1-4, wrapped into ``Z_{2^b}`` (step 5's masking is SecAgg+'s), and the
        excess seeds, one per level, kept by the site until it may reveal them."""
        noisy, seeds = self.noise_share(update.delta.shape[0],
                                        add_to=self.integers(update.delta, seed=seed))
        noisy &= (1 << self.bits) - 1
        return noisy.astype(self._dtype), seeds

    def decode(self, total: np.ndarray, *, seed: bytes, survivors: int, dimension: int,
               removed: Sequence[Sequence[bytes]] = ()) -> tuple[np.ndarray, float]:
        """``total`` less every revealed excess component (``removed``: each revealing
        site's seeds, ``removable(survivors)`` of them), read signed in ``[-2^(b-1),
        2^(b-1))`` modulo ``2^b``, un-rotated and unscaled; the weight is the survivor count
        (each site has weight 1)."""
        allowed = self.removable(survivors)
        words = total.astype(np.int64)
        for seeds in removed:
            problem = reveal_problem(seeds, expected=allowed)
            if problem is not None:
                raise ValueError(problem)
            for level, level_seed in enumerate(seeds):
                words -= self.excess(dimension, level=level, seed=level_seed)
        words &= (1 << self.bits) - 1
        words[words >= 1 << (self.bits - 1)] -= 1 << self.bits
        plan = self.settings.plan(dimension)
        return unrotate(words / plan.scale, seed=seed, dimension=dimension), float(survivors)


class DistributedMean:
    """Server hook: the unmasked noisy sum over the fixed denominator ``m`` (the expected
    cohort), as DP-FedAvg divides (McMahan et al., ICLR 2018); the noise is already in it."""

    def __init__(self, *, expected_cohort: int) -> None:
        self.expected_cohort = expected_cohort

    def transform_combined(self, combined: Combined, *, round: int,
                           rng: np.random.Generator) -> WeightedSum:
        if not isinstance(combined, WeightedSum):
            raise TypeError("distributed DP needs the sum that secure aggregation reveals")
        return WeightedSum(combined.client_ids, combined.total, float(self.expected_cohort),
                           combined.rejected)
