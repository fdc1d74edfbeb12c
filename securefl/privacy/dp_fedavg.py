"""User-level DP-FedAvg (McMahan et al., ICLR 2018) with adaptive clipping (Andrew et al.,
NeurIPS 2021).

Round ``t`` with ``m`` of ``N`` clients sampled (rate ``q = m / N``):

1. each sampled client ``k`` trains, then clips its update to norm ``C``:
   ``Delta_k <- Delta_k * min(1, C / ||Delta_k||)``, and sends it with weight 1;
2. the server sums the clipped updates and adds Gaussian noise:
   ``S = sum_k Delta_k + N(0, (z_Delta C)^2 I)``; every user counts once whatever its data
   size, so one user changes ``S`` by at most ``C`` in L2;
3. the server divides by the fixed denominator ``m`` (the expected number of participants;
   McMahan et al.'s estimator ``f~_f``), so the released mean does not reveal how many
   clients actually took part.

Trust: the server sees the exact sum before it adds the noise, so DP-FedAvg protects a site
from the *users of the released model*, never from the server; threat models whose adversary
includes the server refuse it (``securefl check``).

Accounting, by ``[privacy] sampling``:

* ``"public"`` (the default, and the only rule for a deployment, whose signed audit log
  records every round's participants): amplification by sampling needs a secret sample, so
  each round a client takes part in is one Gaussian mechanism at ``q = 1``,
  ``PrivacyEvent("dp_fedavg", z, 1, 1)``, charged by the client for the release; rounds it
  is not sampled in cost it nothing.
* ``"secret"`` (simulation only): the server samples from a CSPRNG and the run directory does
  not record who took part, so each round is one application of the sampled Gaussian
  mechanism at ``q = m / N`` for every user (amplification covers the rounds in which a user
  was not drawn): ``PrivacyEvent("dp_fedavg", z, q, 1)`` for every client, every round.

The privacy report gives every client's epsilon under both rules.

Adaptive clipping tracks the ``gamma``-quantile of update norms: each client also reports
``b_k = 1[||Delta_k|| <= C]``; the server releases the centred count
``b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2`` and sets
``C <- C exp(-eta_C (b~ - gamma))``.  Centring makes the sum's sensitivity 1/2 (one user moves
it by +-1/2), so its noise multiplier is ``2 sigma_b``; the two releases together are one
Gaussian mechanism of multiplier ``z`` when the update noise uses
``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al., NeurIPS 2021, Theorem 1 and the
centring of section 3; TensorFlow Privacy's ``QuantileEstimatorQuery`` does the same).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from securefl.engine.protection import Combined, Rows, Update, WeightedSum
from securefl.errors import BudgetExceeded, ConfigError
from securefl.privacy.accounting import PrivacyEvent
from securefl.privacy.ledger import PrivacyLedger
from securefl.privacy.randomness import SecureRandom
from securefl.privacy.release import Releases

__all__ = ["SAMPLING_RULES", "ClipState", "UserLevelNoise", "UserLevelTrainer", "clip_factor",
           "clip_update", "clipped_fraction", "update_noise_multiplier"]

SAMPLING_RULES = ("public", "secret")

_log = logging.getLogger(__name__)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / ||delta||)``, the factor that clips an update of norm ``norm`` to ``C``."""
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``(delta * min(1, C / ||delta||), ||delta||)`` in float32 (:func:`clip_factor`)."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    return (delta * np.float32(clip_factor(norm, clip_norm))).astype(np.float32), norm


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float | None) -> float:
    """``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021); ``z`` without
    adaptive clipping (``sigma_b`` is ``None``)."""
    if clipped_count_stddev is None:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2
    if rest <= 0:
        raise ConfigError(
            f"[privacy] adaptive clipping needs 2 * clipped_count_stddev > noise_multiplier, "
            f"got 2 * {clipped_count_stddev:g} <= {noise_multiplier:.4g}; sample more clients "
            f"per round (the default clipped_count_stddev is clients per round / 20) or set a "
            f"larger clipped_count_stddev")
    return rest ** -0.5


def clipped_fraction(bits: Sequence[bool], *, expected_clients: int, noise: float) -> float:
    """The released estimate ``b~ = (sum_k (b_k - 1/2) + noise) / m + 1/2`` of the fraction of
    unclipped updates; ``noise`` is the draw of ``N(0, sigma_b^2)``."""
    centred = sum(float(bit) - 0.5 for bit in bits)
    return (centred + noise) / expected_clients + 0.5


class ClipState:
    """The clipping bound ``C`` shared by the clients and the server of one simulation, and
    the clipped-count bits of the round in progress.

    The bits travel in process: with secure aggregation the server sees each client's bit
    (only in simulation); a deployment would sum them under secure aggregation as an extra
    coordinate, which securefl does not do, so adaptive clipping is simulation-only: with
    clients out of process no bit arrives and ``C`` stays at its initial value on both sides.
    """

    def __init__(self, clip_norm: float, *, adaptive: bool, target_quantile: float = 0.5,
                 learning_rate: float = 0.2, count_stddev: float = 0.0) -> None:
        self.clip_norm = float(clip_norm)
        self.adaptive = adaptive
        self.target_quantile, self.learning_rate = target_quantile, learning_rate
        self.count_stddev = count_stddev
        self._bits: dict[tuple[int, str], bool] = {}
        self._lock = threading.Lock()

    def record(self, round: int, client_id: str, unclipped: bool) -> None:
        with self._lock:
            self._bits[(round, client_id)] = unclipped

    def adapt(self, round: int, client_ids: Sequence[str], *, expected_clients: int,
              rng: np.random.Generator, source: SecureRandom | None = None) -> float | None:
        """``C <- C exp(-eta (b~ - gamma))`` from the round's noisy unclipped fraction
        (:func:`clipped_fraction`; its noise from ``source`` when given, else ``rng``).

        Returns ``b~``, or ``None`` (``C`` unchanged) when no participant's bit reached this
        state: the clients run elsewhere and clip with their own ``C``, so the server must
        keep adding noise for that same ``C``.
        """
        with self._lock:
            bits = [self._bits.pop((round, c)) for c in client_ids if (round, c) in self._bits]
            self._bits = {k: v for k, v in self._bits.items() if k[0] > round}
        if not bits and client_ids:
            _log.warning("adaptive clipping: no clipped-count bits from the clients of round "
                         "%d (they run out of process); the clipping bound stays %g",
                         round, self.clip_norm)
            return None
        draw = (float(source.gaussian(1, self.count_stddev)[0]) if source is not None
                else float(rng.normal(0.0, self.count_stddev)))
        noisy = clipped_fraction(bits, expected_clients=expected_clients, noise=draw)
        self.clip_norm *= math.exp(-self.learning_rate * (noisy - self.target_quantile))
        return noisy


class UserLevelTrainer:
    """A client's trainer under DP-FedAvg: charge, train, clip, weight 1.

    The release is charged ``event`` before training, raising
    :class:`~securefl.errors.BudgetExceeded` (a ``Decline``) when it does not fit.  Under
    ``sampling = "secret"`` every earlier round not charged yet is charged first (each round
    costs every available user, sampled or not).  Repeats are answered from the ledger
    (:class:`~securefl.privacy.release.Releases`).
    """

    def __init__(self, base: Any, *, client_id: str, ledger: PrivacyLedger,
                 event: PrivacyEvent, clip: ClipState, sampling: str = "public") -> None:
        if sampling not in SAMPLING_RULES:
            raise ValueError(f"sampling must be one of {SAMPLING_RULES}, got {sampling!r}")
        self.base, self.client_id, self.ledger = base, client_id, ledger
        self.event, self.clip, self.sampling = event, clip, sampling
        self.releases = Releases(ledger, client_id)

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        release, answer = self.releases.recall(parameters, round=round)
        if answer is not None:
            return answer
        self.catch_up(round)
        spent = self.ledger.charge(self.client_id, self.event, round=round, release=release)
        update, _ = self.base.fit(parameters, round=round)
        clip_norm = self.clip.clip_norm
        clipped, norm = clip_update(update.delta, clip_norm)
        self.clip.record(round, self.client_id, norm <= clip_norm)
        # only public quantities leave the client: its training loss and update norm are not
        metrics = {"epsilon": spent, "delta": self.ledger.delta, "clip_norm": clip_norm}
        return self.releases.keep(release, round=round, update=Update(clipped, 1.0),
                                  metrics=metrics)

    def catch_up(self, round: int) -> None:
        """Under ``sampling = "secret"``, charge every round before ``round`` that this
        client's ledger has not been charged yet (each round costs every user, sampled or
        not); raises :class:`~securefl.errors.BudgetExceeded` at the first that does not fit.
        """
        if self.sampling != "secret":
            return
        charged = set(self.ledger.rounds(self.client_id))
        for past in range(1, round):
            if past not in charged:
                self.ledger.charge(self.client_id, self.event, round=past)

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return self.base.evaluate(parameters)


class UserLevelNoise:
    """Server hook: unit-weight sum + ``N(0, (z_Delta C)^2)``, fixed denominator ``m``.

    ``Rows`` are summed with weight 1 each (their FedAvg weights are ignored: the privacy unit
    is the user).  A ``WeightedSum`` from secure aggregation or HE already carries weight 1 per
    client (:class:`UserLevelTrainer` sends weight 1).  With ``charge_every_round`` (sampling
    ``"secret"``), after the round every client is charged the round's event if it still fits
    its budget: the server's copy of the ledger (in simulation the same file the clients use,
    where a participant's own charge makes this a no-op).

    The noise comes from ``source`` (a CSPRNG) when given: whoever holds the config could
    otherwise regenerate the server's seeded noise and subtract it from the released model.
    Without, from the server's seeded ``rng`` (reproducible simulations).
    """

    def __init__(self, *, clip: ClipState, noise_multiplier: float,
                 update_noise_multiplier: float, expected_clients: int,
                 ledger: PrivacyLedger, client_ids: Sequence[str], event: PrivacyEvent,
                 charge_every_round: bool = True, source: SecureRandom | None = None) -> None:
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.update_noise_multiplier = update_noise_multiplier
        self.expected_clients = expected_clients
        self.ledger, self.client_ids, self.event = ledger, tuple(client_ids), event
        self.charge_every_round, self.source = charge_every_round, source

    def transform_combined(self, combined: Combined, *, round: int,
                           rng: np.random.Generator) -> WeightedSum:
        if isinstance(combined, Rows):
            total = combined.updates.astype(np.float64).sum(axis=0)
        elif isinstance(combined, WeightedSum):
            total = np.asarray(combined.total, dtype=np.float64)
        else:  # the config refuses DP-FedAvg with HE; a sealed sum cannot be noised here
            raise TypeError("DP-FedAvg cannot add noise to an encrypted aggregate")
        std = self.update_noise_multiplier * self.clip.clip_norm
        noise = (self.source.gaussian(total.size, std).numpy().reshape(total.shape)
                 if self.source is not None else rng.normal(0.0, std, size=total.shape))
        noisy = total + noise
        if self.clip.adaptive:
            self.clip.adapt(round, combined.client_ids, expected_clients=self.expected_clients,
                            rng=rng, source=self.source)
        if self.charge_every_round:
            self._charge_round(round)
        return WeightedSum(combined.client_ids, noisy, float(self.expected_clients),
                           combined.rejected)

    def _charge_round(self, round: int) -> None:
        for client_id in self.client_ids:
            try:
                self.ledger.charge(client_id, self.event, round=round)
            except BudgetExceeded:
                continue  # that client has stopped contributing: nothing more is spent
