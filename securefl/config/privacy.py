"""``[privacy]``: differential privacy settings (sample-level DP-SGD or user-level DP-FedAvg).

* ``mode = "dp_sgd"``: every client trains with Opacus DP-SGD (Abadi et al., CCS 2016); the
  privacy unit is one training example of that client.  ``noise_multiplier`` is taken as given
  or calibrated from ``target_epsilon`` over the whole planned run.
* ``mode = "dp_fedavg"``: user-level DP-FedAvg (McMahan et al., ICLR 2018); the privacy unit is
  a whole client.  Each update is clipped to ``clip_norm`` and the server adds
  ``N(0, (noise_multiplier * clip_norm)^2)`` to the sum; ``adaptive_clipping`` follows Andrew et
  al. (NeurIPS 2021).  The server adds the noise, so only a trusted server may run it.
* ``mode = "distributed"``: user-level DP without trusting the server, the distributed Skellam
  mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021) under ``[protection] kind = "secagg"``:
  each site clips to ``clip_norm``, rotates, rounds to integers of ``bits`` bits and adds its
  own share of Skellam noise before masking (:mod:`securefl.privacy.distributed`).  The noise
  is calibrated so that any ``min_cohort`` surviving sites, ``colluding_sites`` of which may
  reveal their shares to the server, give ``target_epsilon``; a round with fewer survivors
  aborts before anything is revealed.  ``noise_levels`` (default ``[expected_cohort]``)
  make the excess of that noise removable: once ``|U3| >= l_j`` survivors are verified, each
  reveals the seeds of its excess components up to level ``l_j`` and the server subtracts
  them, so the released sum carries about the noise of ``l_j - colluding_sites`` shares.

Every client's spend is charged to its own :class:`~securefl.privacy.ledger.PrivacyLedger`,
which refuses a round that would take it past ``budget`` (default: ``target_epsilon``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from securefl.config.parse import check

__all__ = ["PrivacyConfig", "noise_levels_problem"]


@dataclass(frozen=True)
class PrivacyConfig:
    mode: Literal["none", "dp_sgd", "dp_fedavg", "distributed"] = "none"
    #: total epsilon of the whole planned run; calibrates ``noise_multiplier`` when that is unset
    target_epsilon: float | None = None
    #: delta of every (epsilon, delta) statement; must be < 1 / (size of the protected dataset)
    delta: float = 1e-5
    noise_multiplier: float | None = None
    #: DP-SGD per-example clipping bound
    max_grad_norm: float = 1.0
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost"] = "hooks"
    #: DP randomness from a CSPRNG (securefl.privacy.randomness): unset = true at a deployed
    #: site or server, false (seeded, reproducible) in simulation; false at a deployed site
    #: makes its noise predictable from the shared config (securefl check fails it)
    secure_mode: bool | None = None
    #: replace layers Opacus cannot train (BatchNorm -> GroupNorm) instead of refusing the model
    fix_model: bool = False
    #: per-client epsilon budget enforced by the ledger; default ``target_epsilon``
    budget: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    #: DP-FedAvg: L2 bound C of each client update (the initial value with adaptive clipping)
    clip_norm: float = 1.0
    adaptive_clipping: bool = False
    #: adaptive clipping: the quantile gamma of update norms that C tracks
    target_quantile: float = 0.5
    #: adaptive clipping: the geometric step eta_C of ``C <- C * exp(-eta_C (b - gamma))``
    clip_learning_rate: float = 0.2
    #: adaptive clipping: std sigma_b of the noise on the clipped count (default: m / 20)
    clipped_count_stddev: float | None = None
    #: DP-FedAvg accounting: "public" (q = 1 per round taken part in: participants are
    #: logged) or "secret" (q = m / N every round; simulation only, CSPRNG sample, unlogged)
    sampling: Literal["public", "secret"] = "public"
    #: public sampling: calibrate for the p-quantile of a client's Binomial(rounds, m / N)
    #: participations (it runs out of budget early w.p. <= 1 - p); unset: 0.999 for
    #: "distributed" (a site out of budget can sink a round below min_cohort), the expected
    #: ceil(rounds m / N) for "dp_fedavg" (its rounds go on with fewer updates)
    participation_quantile: float | None = None
    #: distributed: bits per coordinate of the masked words (the SecAgg+ field is Z_{2^bits})
    bits: int = 16
    #: distributed: the expected number of surviving sites per round (the fixed denominator);
    #: default [server] clients per round
    expected_cohort: int | None = None
    #: distributed: the fewest survivors whose noise shares add up to the calibrated noise;
    #: default expected_cohort (no dropout tolerated)
    min_cohort: int | None = None
    #: distributed: sites whose noise shares the adversary may know (colluding with it)
    colluding_sites: int = 0
    #: distributed: survivor counts l_1 < ... < l_r in (min_cohort, expected_cohort] at which
    #: the excess noise of the levels <= |U3| is removed; default [expected_cohort] (none when
    #: min_cohort = expected_cohort); [] keeps all of it
    noise_levels: tuple[int, ...] | None = None

    def validate(self) -> None:
        check(self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon",
              f"must be > 0, got {self.target_epsilon}")
        check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}")
        check(self.noise_multiplier is None or self.noise_multiplier > 0, "noise_multiplier",
              f"must be > 0, got {self.noise_multiplier}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        check(self.budget is None or self.budget > 0, "budget", f"must be > 0, got {self.budget}")
        check(self.clip_norm > 0, "clip_norm", f"must be > 0, got {self.clip_norm}")
        check(0 < self.target_quantile < 1, "target_quantile",
              f"must be in (0, 1), got {self.target_quantile}")
        check(self.clip_learning_rate > 0, "clip_learning_rate",
              f"must be > 0, got {self.clip_learning_rate}")
        check(self.clipped_count_stddev is None or self.clipped_count_stddev > 0,
              "clipped_count_stddev", f"must be > 0, got {self.clipped_count_stddev}")
        if self.mode == "none":
            return
        check((self.target_epsilon is None) != (self.noise_multiplier is None), "target_epsilon",
              f"or noise_multiplier must be set (exactly one of them) for mode {self.mode!r}")
        check(self.mode == "dp_fedavg" or not self.adaptive_clipping, "adaptive_clipping",
              "applies to mode \"dp_fedavg\" only (DP-SGD clips per example at max_grad_norm)")
        check(self.sampling == "public" or self.secure_mode is not False, "sampling",
              "\"secret\" needs secure_mode: a sample drawn from the seeded generator can be "
              "recomputed by anyone holding the config")
        check(self.participation_quantile is None
              or (self.mode in ("dp_fedavg", "distributed") and self.sampling == "public"
                  and 0 < self.participation_quantile < 1), "participation_quantile",
              "applies to modes \"dp_fedavg\" and \"distributed\" with sampling = \"public\" "
              f"and must be in (0, 1), got {self.participation_quantile}")
        if self.mode == "distributed":
            self._validate_distributed()

    def _validate_distributed(self) -> None:
        mode = "for mode \"distributed\""
        check(self.target_epsilon is not None, "target_epsilon",
              f"must be set {mode} (the noise is calibrated from it)")
        check(self.accountant == "rdp", "accountant",
              f"must be \"rdp\" {mode}: the Skellam bound is an RDP bound")
        check(self.sampling == "public", "sampling",
              f"must be \"public\" {mode} (q = 1 per round taken part in)")
        check(not self.adaptive_clipping, "adaptive_clipping",
              f"is not supported {mode}: clip_norm is fixed")
        check(self.secure_mode is not False, "secure_mode",
              f"cannot be false {mode}: each site's noise share always comes from its CSPRNG")
        check(isinstance(self.bits, int) and 2 <= self.bits <= 32, "bits",
              f"must be an integer in [2, 32], got {self.bits!r}")
        check(self.expected_cohort is None or self.expected_cohort >= 1, "expected_cohort",
              f"must be >= 1, got {self.expected_cohort}")
        check(self.colluding_sites >= 0, "colluding_sites",
              f"must be >= 0, got {self.colluding_sites}")
        check(self.min_cohort is None or self.min_cohort > self.colluding_sites, "min_cohort",
              f"must be > colluding_sites ({self.colluding_sites}), got {self.min_cohort}")
        check(self.min_cohort is None or self.expected_cohort is None
              or self.min_cohort <= self.expected_cohort, "min_cohort",
              f"must be <= expected_cohort ({self.expected_cohort}), got {self.min_cohort}")
        self._validate_levels()

    def _validate_levels(self) -> None:
        problem = noise_levels_problem(self.noise_levels or (),
                                       low=max(self.min_cohort or 0, self.colluding_sites),
                                       high=self.expected_cohort)
        check(problem is None, "noise_levels", problem or "")

    @property
    def epsilon_budget(self) -> float | None:
        """The per-client budget the ledger enforces (``budget``, else ``target_epsilon``)."""
        return self.budget if self.budget is not None else self.target_epsilon


def noise_levels_problem(levels: Sequence[int], *, low: int, high: int | None) -> str | None:
    """The rule of distributed DP's noise levels ``l_1 < ... < l_r``: strictly increasing in
    ``(low, high] = (min_cohort, expected_cohort]`` (``high = None``: not known yet); the
    reason they break it, or ``None``."""
    if (all(b > a for a, b in itertools.pairwise([low, *levels]))
            and (high is None or all(level <= high for level in levels))):
        return None
    return (f"must increase strictly within (min_cohort, expected_cohort] = ({low}, "
            f"{'expected_cohort' if high is None else high}], got {list(levels)}")
