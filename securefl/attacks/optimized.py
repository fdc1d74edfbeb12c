"""Optimisation-based update attacks: Min-Max, Min-Sum and the AGR-tailored attack
(Shejwalkar & Houmansadr, NDSS 2021) and the full/partial-knowledge attack on Krum (Fang et
al., USENIX Security 2020).

The call convention is the one of :mod:`securefl.attacks.poisoning`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from securefl.aggregation.base import Aggregator
from securefl.attacks.poisoning import visible_rows

__all__ = ["AGRTailored", "FangKrum", "MinMax", "MinSum", "krum_index", "perturbation"]

Perturbation = Literal["std", "unit_vec", "sign"]


def perturbation(rows: np.ndarray, kind: Perturbation) -> np.ndarray:
    """The perturbation direction ``grad_p`` of Shejwalkar & Houmansadr (Section IV-B).

    ``unit_vec``: ``-mu / |mu|`` (inverse unit vector); ``std``: ``-sigma`` (inverse
    coordinate-wise standard deviation); ``sign``: ``-sign(mu)`` (inverse sign).
    """
    mu = rows.mean(axis=0)
    if kind == "unit_vec":
        length = np.linalg.norm(mu)
        return -mu / length if length > 0 else np.zeros_like(mu)
    if kind == "std":
        return -(rows.std(axis=0, ddof=1) if rows.shape[0] > 1 else np.zeros_like(mu))
    if kind == "sign":
        return -np.sign(mu)
    raise ValueError(f"perturbation must be 'std', 'unit_vec' or 'sign', got {kind!r}")


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a_i - b_j|^2`` for all pairs, clipped at 0 against rounding."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


class _GammaSearch:
    """Algorithm 1 of Shejwalkar & Houmansadr: the largest ``gamma`` passing ``accept``.

    Start at ``gamma_init`` with step ``gamma_init / 2``; after each test move ``gamma`` up
    (success) or down (failure) by the step and halve the step, until two successive values
    differ by less than ``tolerance``.  Returns the last successful ``gamma`` (0 if none).
    """

    def __init__(self, *, gamma_init: float, tolerance: float) -> None:
        if not (math.isfinite(gamma_init) and gamma_init > 0):
            raise ValueError(f"gamma_init must be a finite number > 0, got {gamma_init!r}")
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
        self.gamma_init, self.tolerance = float(gamma_init), float(tolerance)

    def search(self, accept: object) -> float:
        gamma, step, best = self.gamma_init, self.gamma_init / 2, 0.0
        while True:
            if accept(gamma):  # type: ignore[operator]
                best, gamma = gamma, gamma + step
            else:
                gamma = gamma - step
            step /= 2
            if abs(best - gamma) < self.tolerance or step < self.tolerance / 4:
                return best


class _AgrAgnostic:
    """Shared body of Min-Max and Min-Sum: ``grad_m = mu + gamma * grad_p`` (eq. 6-7)."""

    def __init__(self, *, perturbation: Perturbation = "std", gamma_init: float = 10.0,
                 tolerance: float = 1e-5, omniscient: bool = True) -> None:
        if perturbation not in ("std", "unit_vec", "sign"):
            raise ValueError(
                f"perturbation must be 'std', 'unit_vec' or 'sign', got {perturbation!r}")
        self.perturbation: Perturbation = perturbation
        self._search = _GammaSearch(gamma_init=gamma_init, tolerance=tolerance)
        self.omniscient = bool(omniscient)

    def _accept(self, rows: np.ndarray) -> object:
        raise NotImplementedError

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        mu, direction = rows.mean(axis=0), perturbation(rows, self.perturbation)
        accept = self._accept(rows)
        gamma = self._search.search(lambda g: accept(mu + g * direction))  # type: ignore[operator]
        self.last_gamma = gamma
        return np.repeat((mu + gamma * direction)[None, :], num_byzantine, axis=0).astype(
            np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(perturbation={self.perturbation!r})"


class MinMax(_AgrAgnostic):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, eq. 6).

    ``argmax_gamma  max_i |grad_m - g_i| <= max_{i,j} |g_i - g_j|``: the malicious update is
    no farther from any benign update than the two farthest benign updates are from each
    other.  ``gamma`` comes from the paper's halving search (:class:`_GammaSearch`,
    ``gamma_init = 10``, ``tau = 1e-5``); ``perturbation`` picks ``grad_p``.
    With ``omniscient=False`` the benign set is the attackers' own honest updates
    (the paper's partial-knowledge setting).
    """

    def _accept(self, rows: np.ndarray) -> object:
        bound = _squared_distances(rows, rows).max()

        def accept(candidate: np.ndarray) -> bool:
            return bool(_squared_distances(candidate[None, :], rows).max() <= bound)

        return accept


class MinSum(_AgrAgnostic):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, eq. 7).

    ``argmax_gamma  sum_i |grad_m - g_i|^2 <= max_i sum_j |g_i - g_j|^2``: the malicious
    update's total squared distance to the benign updates stays within that of the most
    outlying benign update.  Same search and perturbations as :class:`MinMax`.
    """

    def _accept(self, rows: np.ndarray) -> object:
        bound = _squared_distances(rows, rows).sum(axis=1).max()

        def accept(candidate: np.ndarray) -> bool:
            return bool(_squared_distances(candidate[None, :], rows).sum() <= bound)

        return accept


class AGRTailored(_AgrAgnostic):
    """AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021, Section IV-A, eq. 4): an
    adaptive attacker that knows the server's rule ``f_agr``.

    ``argmax_gamma  |mu - f_agr(grad_m x f  U  benign)|`` with ``grad_m = mu + gamma * grad_p``:
    the same halving search as Min-Max, where a ``gamma`` succeeds when it moves the aggregate
    farther from ``mu`` than the previously tried ``gamma`` did (the paper's code keeps the
    last loss; the first trial always succeeds).  Needs ``aggregator``; the harness hands it
    over for attacks declared ``adaptive = true``.
    """

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        if aggregator is None:
            raise ValueError("the AGR-tailored attack needs the server's rule: pass aggregator= "
                             "(in a scenario, set adaptive = true)")
        self._aggregator, self._num_byzantine = aggregator, num_byzantine
        return super().__call__(honest, num_byzantine=num_byzantine, rng=rng)

    def _accept(self, rows: np.ndarray) -> object:
        mu, previous = rows.mean(axis=0), [-1.0]
        tile = np.ones((self._num_byzantine, 1))

        def accept(candidate: np.ndarray) -> bool:
            stacked = np.concatenate([tile * candidate, rows]).astype(np.float32)
            loss = float(np.linalg.norm(self._aggregator(stacked) - mu))
            improved, previous[0] = loss > previous[0], loss
            return improved

        return accept


def krum_index(rows: np.ndarray, num_byzantine: int) -> int:
    """Index Krum selects (Blanchard et al. 2017): least sum of squared distances to the
    ``n - f - 2`` nearest other rows; ties go to the lowest index."""
    n = rows.shape[0]
    neighbours = n - num_byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs n > f + 2, got n={n}, f={num_byzantine}")
    sq = _squared_distances(rows, rows)
    np.fill_diagonal(sq, np.inf)
    scores = np.sort(sq, axis=1)[:, :neighbours].sum(axis=1)
    return int(np.argmin(scores))


class FangKrum:
    """Local model poisoning attack on Krum (Fang et al., USENIX Security 2020, Section 3.2).

    The first byzantine update is ``-lambda * s`` (in update form, ``w'_1 - w_Re``) with
    ``s = sign(mean of the benign updates)`` the estimated change direction; the other ``c - 1``
    lie within ``radius`` of it (identical for ``radius = 0``, the case the paper's bound
    assumes).  ``lambda`` starts at the paper's upper bound

        lambda_max = min_i sum_{l in Gamma_i} D(w_l, w_i) / ((m - 2c - 1) sqrt(d))
                     + max_i D(w_i, w_Re) / sqrt(d)

    (``Gamma_i``: the ``m - c - 2`` benign models nearest to ``w_i``; ``m`` clients, ``c``
    byzantine, ``D`` Euclidean) and is halved until Krum selects ``w'_1`` or it drops below
    ``threshold`` (then the attack sends ``-threshold * s``).  Full knowledge
    (``omniscient=True``) uses all benign updates; partial knowledge uses the attackers' own
    honest updates in their place.  With ``aggregator`` given, selection is checked against
    that rule instead of the built-in Krum (an adaptive attacker).
    """

    def __init__(self, *, num_clients: int | None = None, radius: float = 0.0,
                 threshold: float = 1e-5, omniscient: bool = True) -> None:
        if num_clients is not None and (not isinstance(num_clients, int) or num_clients < 1):
            raise ValueError(f"num_clients must be an int >= 1 or None, got {num_clients!r}")
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
        self.num_clients, self.radius, self.threshold = num_clients, float(radius), threshold
        self.omniscient = bool(omniscient)

    def lambda_max(self, rows: np.ndarray, num_byzantine: int, num_clients: int) -> float:
        """The paper's upper bound on ``lambda`` (see the class docstring)."""
        h, d = rows.shape
        if num_clients - 2 * num_byzantine - 1 < 1:
            raise ValueError(f"Fang's bound needs m > 2c + 1, got m={num_clients}, "
                             f"c={num_byzantine}")
        nearest = max(min(num_clients - num_byzantine - 2, h - 1), 1)
        dist = np.sqrt(_squared_distances(rows, rows))
        np.fill_diagonal(dist, np.inf)
        if h > 1:
            spread = np.sort(dist, axis=1)[:, :nearest].sum(axis=1).min()
        else:
            spread = 0.0
        reach = np.linalg.norm(rows, axis=1).max()
        return float(spread / ((num_clients - 2 * num_byzantine - 1) * math.sqrt(d))
                     + reach / math.sqrt(d))

    def _selected(self, crafted: np.ndarray, rows: np.ndarray, num_byzantine: int,
                  aggregator: Aggregator | None) -> bool:
        stacked = np.concatenate([crafted, rows]).astype(np.float32)
        if aggregator is not None:
            return bool(np.allclose(aggregator(stacked), crafted[0], rtol=0, atol=1e-6))
        return krum_index(stacked, num_byzantine) < num_byzantine

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        if num_byzantine == 0:
            return np.zeros((0, rows.shape[1]), np.float32)
        m = self.num_clients or rows.shape[0] + num_byzantine
        direction = np.sign(rows.mean(axis=0))
        others = self._ball(rng, num_byzantine - 1, rows.shape[1])
        lam = self.lambda_max(rows, num_byzantine, m)
        while lam >= self.threshold:
            crafted = -lam * direction
            candidate = np.concatenate([crafted[None, :], crafted[None, :] + others])
            if self._selected(candidate, rows, num_byzantine, aggregator):
                break
            lam /= 2
        lam = max(lam, self.threshold)
        self.last_lambda = lam
        crafted = -lam * direction
        return np.concatenate([crafted[None, :], crafted[None, :] + others]).astype(np.float32)

    def _ball(self, rng: np.random.Generator, count: int, d: int) -> np.ndarray:
        """``count`` points uniform in the ``d``-ball of ``radius`` (zeros when radius is 0)."""
        if self.radius == 0 or count == 0:
            return np.zeros((count, d))
        points = rng.normal(size=(count, d))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points * self.radius * rng.random((count, 1)) ** (1.0 / d)

    def __repr__(self) -> str:
        return f"FangKrum(num_clients={self.num_clients}, omniscient={self.omniscient})"
