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

Accounting: each round is one application of the sampled Gaussian mechanism with noise
multiplier ``z`` and sample rate ``q`` for every user (amplification by sampling covers the
rounds in which the user was not drawn), i.e. ``PrivacyEvent("dp_fedavg", z, q, 1)``.

Adaptive clipping tracks the ``gamma``-quantile of update norms: each client also reports
``b_k = 1[||Delta_k|| <= C]``; the server releases ``b~ = (sum_k b_k + N(0, sigma_b^2)) / m``
and sets ``C <- C exp(-eta_C (b~ - gamma))``.  The two releases together are accounted as one
Gaussian mechanism of multiplier ``z`` when the update noise uses
``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al., Theorem 1).
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
from securefl.privacy.ledger import PrivacyLedger, RoundMemo

__all__ = ["ClipState", "UserLevelNoise", "UserLevelTrainer", "clip_update",
           "update_noise_multiplier"]

_log = logging.getLogger(__name__)


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``(delta * min(1, C / ||delta||), ||delta||)`` in float32."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (delta * np.float32(scale)).astype(np.float32), norm


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
              rng: np.random.Generator) -> float | None:
        """``C <- C exp(-eta (b~ - gamma))`` from the round's noisy unclipped fraction.

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
        noisy = (sum(bits) + rng.normal(0.0, self.count_stddev)) / expected_clients
        self.clip_norm *= math.exp(-self.learning_rate * (noisy - self.target_quantile))
        return noisy


class UserLevelTrainer:
    """A client's trainer under DP-FedAvg: charge, train, clip, weight 1.

    Before training for round ``r`` the client charges its ledger one event for every round
    up to ``r`` not charged yet (each round costs every available user, sampled or not), raising
    :class:`~securefl.errors.BudgetExceeded` (a ``Decline``) at the first that does not fit.
    """

    def __init__(self, base: Any, *, client_id: str, ledger: PrivacyLedger,
                 event: PrivacyEvent, clip: ClipState) -> None:
        self.base, self.client_id, self.ledger = base, client_id, ledger
        self.event, self.clip = event, clip
        self._memo = RoundMemo()

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        if (answer := self._memo.recall(round, parameters)) is not None:
            return answer
        charged = set(self.ledger.rounds(self.client_id))
        spent = 0.0
        for past in range(1, round + 1):
            if past not in charged or past == round:
                spent = self.ledger.charge(self.client_id, self.event, round=past)
        update, _ = self.base.fit(parameters, round=round)
        clip_norm = self.clip.clip_norm
        clipped, norm = clip_update(update.delta, clip_norm)
        self.clip.record(round, self.client_id, norm <= clip_norm)
        # only public quantities leave the client: its training loss and update norm are not
        metrics = {"epsilon": spent, "delta": self.ledger.delta, "clip_norm": clip_norm}
        return self._memo.keep(round, parameters, Update(clipped, 1.0), metrics)

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return self.base.evaluate(parameters)


class UserLevelNoise:
    """Server hook: unit-weight sum + ``N(0, (z_Delta C)^2)``, fixed denominator ``m``.

    ``Rows`` are summed with weight 1 each (their FedAvg weights are ignored: the privacy unit
    is the user).  A ``WeightedSum`` from secure aggregation or HE already carries weight 1 per
    client (:class:`UserLevelTrainer` sends weight 1).  After the round, every client
    is charged the round's event if it still fits its budget: the server's copy of the ledger
    (in simulation the same file the clients use, where a participant's own charge makes this
    a no-op).
    """

    def __init__(self, *, clip: ClipState, noise_multiplier: float,
                 update_noise_multiplier: float, expected_clients: int,
                 ledger: PrivacyLedger, client_ids: Sequence[str], event: PrivacyEvent) -> None:
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.update_noise_multiplier = update_noise_multiplier
        self.expected_clients = expected_clients
        self.ledger, self.client_ids, self.event = ledger, tuple(client_ids), event

    def transform_combined(self, combined: Combined, *, round: int,
                           rng: np.random.Generator) -> WeightedSum:
        if isinstance(combined, Rows):
            total = combined.updates.astype(np.float64).sum(axis=0)
        else:
            total = np.asarray(combined.total, dtype=np.float64)
        std = self.update_noise_multiplier * self.clip.clip_norm
        noisy = total + rng.normal(0.0, std, size=total.shape)
        if self.clip.adaptive:
            self.clip.adapt(round, combined.client_ids, expected_clients=self.expected_clients,
                            rng=rng)
        self._charge_round(round)
        return WeightedSum(combined.client_ids, noisy, float(self.expected_clients),
                           combined.rejected)

    def _charge_round(self, round: int) -> None:
        for client_id in self.client_ids:
            try:
                self.ledger.charge(client_id, self.event, round=round)
            except BudgetExceeded:
                continue  # that client has stopped contributing: nothing more is spent
