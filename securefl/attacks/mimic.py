"""The mimic attack (Karimireddy, He & Jaggi, ICLR 2022, Section 4 and their code's
``MimicVariantAttacker``): every byzantine worker sends a copy of one honest worker's update.

Under heterogeneous data a robust rule that discards outliers ends up over-weighting the
copied worker's data distribution; the attack needs no knowledge of the rule.
"""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Aggregator
from securefl.attacks.poisoning import visible_rows

__all__ = ["Mimic"]


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


class Mimic:
    """Copy honest worker ``i*``'s update into every byzantine row, every round.

    ``i*`` is chosen in the first ``warmup`` rounds as the worker whose update reaches
    furthest along the honest updates' top principal direction ``z``, then kept for the rest
    of the run (the paper's code, with its default ``warmup = 1``):

    * round 0: ``mu = mean_i g_i``, ``z0 ~ N(0, I)`` (from the attack's ``rng``),
      ``z = sum_i <g_i - mu, z0> (g_i - mu)``, normalised (one power-iteration step);
    * warm-up round ``t >= 1``: ``mu <- t/(t+1) mu + mean_i g_i / (t+1)`` and
      ``z <- t/(t+1) z + u/(t+1)`` with ``u`` the normalised power step from ``z``, normalised;
    * in each warm-up round ``i* = argmax_i <g_i, z>``.

    The attack is omniscient: it sees every honest update, identified by its position in
    the view, so the honest rows must arrive in the same client order each round (the
    harness passes them in client-id order, every client taking part in every round of the
    paper's setting).
    """

    omniscient = True

    def __init__(self, *, warmup: int = 1) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.warmup = warmup
        self.round = 0
        self.target: int | None = None
        self._mu: np.ndarray | None = None
        self._z: np.ndarray | None = None

    def _power_step(self, centred: np.ndarray, z: np.ndarray) -> np.ndarray:
        return _unit(centred.T @ (centred @ z))

    def _track(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        mean = rows.mean(axis=0)
        t = self.round
        if self._mu is None or self._z is None:
            self._mu = mean
            start = np.asarray(rng.standard_normal(rows.shape[1]))
            self._z = self._power_step(rows - mean, start)
        else:
            self._mu = t / (t + 1) * self._mu + mean / (t + 1)
            step = self._power_step(rows - self._mu, self._z)
            self._z = _unit(t / (t + 1) * self._z + step / (t + 1))
        self.target = int(np.argmax(rows @ self._z))

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        if self.round < self.warmup or self.target is None:
            self._track(rows, rng)
        self.round += 1
        if self.target is None or self.target >= rows.shape[0]:
            raise ValueError(f"mimic's target worker {self.target} is not among the "
                             f"{rows.shape[0]} honest rows of this round")
        return np.repeat(rows[self.target][None, :].astype(np.float32), num_byzantine, axis=0)

    def __repr__(self) -> str:
        return f"Mimic(warmup={self.warmup}, target={self.target})"
