"""Update (model-poisoning) attacks: the byzantine rows, computed from what the attacker sees.

Every attack is a small class with the same call::

    attack(honest, *, num_byzantine=f, rng=rng, aggregator=None) -> (f, d) float32

``honest`` holds the benign updates the attacker can see, one row each.  An *omniscient*
attacker (``omniscient=True``) sees every honest client's update of the round; a
non-omniscient one sees only the updates its own byzantine clients computed honestly on
their own data (the "partial knowledge" of Fang et al. 2020 and Shejwalkar & Houmansadr
2021, the threat model of Baruch et al. 2019).  The harness hands each attack the view its
``omniscient`` attribute asks for.  ``aggregator`` is the server's rule, for adaptive
attackers that know it.

Attacks whose formula needs the number of clients in the round take it as the keyword
``num_clients``; left ``None``, it is ``h + f`` (right for the omniscient view).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from securefl.aggregation.base import Aggregator

__all__ = [
    "ALIE",
    "IPM",
    "GaussianNoise",
    "Scaling",
    "SignFlip",
    "alie_z",
    "checked_rows",
    "visible_rows",
]


def visible_rows(honest: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Validate the attacker's view and the byzantine count; return the rows as float64."""
    return checked_rows(honest, num_byzantine).astype(np.float64)


def checked_rows(honest: np.ndarray, num_byzantine: int) -> np.ndarray:
    """:func:`visible_rows` without the float64 copy: the validated rows as given, for an
    attack that only reduces them (in float64, ``rows.mean(axis=0, dtype=np.float64)``,
    the same numbers as on the copy)."""
    rows = np.asarray(honest)
    if rows.ndim != 2 or rows.shape[0] < 1:
        raise ValueError(f"honest must have shape (h, d) with h >= 1, got {rows.shape}")
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int | np.integer):
        raise TypeError(f"num_byzantine must be an int, got {type(num_byzantine).__name__}")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if not np.isfinite(rows).all():
        raise ValueError("honest updates must be finite")
    return rows


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _clients(num_clients: int | None, minimum: int = 1) -> int | None:
    if num_clients is not None and (not isinstance(num_clients, int) or num_clients < minimum):
        raise ValueError(f"num_clients must be an int >= {minimum} or None, got {num_clients!r}")
    return num_clients


def _tile(row: np.ndarray, count: int) -> np.ndarray:
    return np.repeat(row[None, :].astype(np.float32), count, axis=0)


class SignFlip:
    """Sign flipping: byzantine row ``i`` is ``-scale * g_(i mod h)`` for the visible rows ``g``.

    With the non-omniscient view each byzantine client sends its own honest update reversed
    (the "sign flipping" of Li et al., AAAI 2019; ``scale = 4`` is the "-4 x gradient"
    variant of Xie et al., UAI 2019).  Under FedAvg with a fraction ``p`` of attackers the
    expected aggregate is ``(1 - p - scale * p) * mean``: it stalls at ``scale = (1 - p) / p``.
    """

    def __init__(self, *, scale: float = 1.0, omniscient: bool = False) -> None:
        self.scale = _positive("scale", scale)
        self.omniscient = bool(omniscient)

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        picks = np.arange(num_byzantine) % rows.shape[0]
        return (-self.scale * rows[picks]).astype(np.float32)

    def __repr__(self) -> str:
        return f"SignFlip(scale={self.scale})"


class GaussianNoise:
    """Gaussian noise: each byzantine row is drawn from ``N(mean, std^2 I)``, independently.

    Needs no knowledge of honest updates (the "Gaussian attack" of Fang et al., USENIX
    Security 2020, and Blanchard et al. 2017).  ``around_honest=True`` centres the noise on
    the mean of the visible rows instead of on ``mean``.
    """

    def __init__(self, *, std: float = 1.0, mean: float = 0.0,
                 around_honest: bool = False) -> None:
        self.std = _positive("std", std)
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean!r}")
        self.mean = float(mean)
        self.around_honest = bool(around_honest)
        self.omniscient = False

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        centre = rows.mean(axis=0) if self.around_honest else np.full(rows.shape[1], self.mean)
        noise = rng.normal(0.0, self.std, size=(num_byzantine, rows.shape[1]))
        return (centre[None, :] + noise).astype(np.float32)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std}, mean={self.mean})"


class Scaling:
    """Model replacement (Bagdasaryan et al., AISTATS 2020, eq. 3): ``L = gamma (X - G) + G``.

    In update form the attacker submits ``gamma * delta``, where ``delta = X - G`` is its own
    (typically backdoored) update: the mean of the visible rows, which for this
    non-omniscient attack are the byzantine clients' own honest-by-their-data updates.  The
    paper sets ``gamma = n / eta`` (``n`` participants this round, ``eta`` the server learning
    rate), so that after FedAvg the global model becomes ``X`` when the other updates roughly
    cancel.  The paper's attacker is a single client; ``f`` colluding byzantine clients split
    the factor, each sending ``(gamma / f) * delta``, so that their sum is the paper's
    replacement update (``f = 1`` is exactly the paper's case; without the split ``f``
    attackers would overshoot ``X`` by a factor ``f``).  An explicit ``gamma`` overrides the
    formula and is split the same way.
    """

    def __init__(self, *, num_clients: int | None = None, server_lr: float = 1.0,
                 gamma: float | None = None, omniscient: bool = False) -> None:
        self.num_clients = _clients(num_clients)
        self.server_lr = _positive("server_lr", server_lr)
        self.gamma = None if gamma is None else _positive("gamma", gamma)
        self.omniscient = bool(omniscient)

    def factor(self, num_participants: int) -> float:
        """``gamma``, else ``n / eta`` with ``n = num_clients`` or ``num_participants``."""
        if self.gamma is not None:
            return self.gamma
        return (self.num_clients or num_participants) / self.server_lr

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        if num_byzantine == 0:
            return np.zeros((0, rows.shape[1]), np.float32)
        gamma = self.factor(rows.shape[0] + num_byzantine)
        return _tile(gamma / num_byzantine * rows.mean(axis=0), num_byzantine)

    def __repr__(self) -> str:
        return f"Scaling(gamma={self.gamma}, num_clients={self.num_clients})"


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """ALIE's ``z_max`` (Baruch et al., NeurIPS 2019, Algorithm 1, lines 1-2).

    ``s = floor(n/2 + 1) - f`` honest "supporters" are needed for a majority, and ``z_max``
    is the largest ``z`` with ``Phi(z) < (n - s) / n`` for the standard normal CDF ``Phi``,
    i.e. ``z_max = Phi^-1((n - s) / n)`` with ``n`` counting *all* clients.  Some published
    implementations use ``(n - f - s) / (n - f)`` instead, or a hard-coded ``z = 1``: for
    ``n = 20, f = 4`` those give 0.157 and 1.0 against the paper's 0.385.
    """
    if num_byzantine < 0 or num_clients <= num_byzantine:
        raise ValueError(f"need 0 <= f < n, got n={num_clients}, f={num_byzantine}")
    supporters = math.floor(num_clients / 2 + 1) - num_byzantine
    if supporters < 1:
        raise ValueError(f"ALIE's z needs a byzantine minority, s = floor(n/2 + 1) - f >= 1; "
                         f"got n={num_clients}, f={num_byzantine} (give z explicitly)")
    return float(norm.ppf((num_clients - supporters) / num_clients))


class ALIE:
    """A Little Is Enough (Baruch et al., NeurIPS 2019, Algorithm 1).

    Every byzantine row is ``mu + z * sigma`` with ``mu_j`` and ``sigma_j`` the coordinate-wise
    mean and (sample) standard deviation of the visible rows, and ``z`` = :func:`alie_z` of
    ``(n, f)`` unless given explicitly.  The paper's attacker is non-omniscient: it estimates
    ``mu`` and ``sigma`` from its own clients' honest updates (the default here);
    ``omniscient=True`` uses every honest update, as several later evaluations do.
    """

    def __init__(self, *, z: float | None = None, num_clients: int | None = None,
                 omniscient: bool = False) -> None:
        if z is not None and not math.isfinite(z):
            raise ValueError(f"z must be finite, got {z!r}")
        self.z = None if z is None else float(z)
        self.num_clients = _clients(num_clients, minimum=2)
        self.omniscient = bool(omniscient)

    def z_for(self, num_byzantine: int, num_visible: int) -> float:
        if self.z is not None:
            return self.z
        return alie_z(self.num_clients or num_visible + num_byzantine, num_byzantine)

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = visible_rows(honest, num_byzantine)
        if num_byzantine == 0:
            return np.zeros((0, rows.shape[1]), np.float32)
        sigma = rows.std(axis=0, ddof=1) if rows.shape[0] > 1 else np.zeros(rows.shape[1])
        z = self.z_for(num_byzantine, rows.shape[0])
        return _tile(rows.mean(axis=0) + z * sigma, num_byzantine)

    def __repr__(self) -> str:
        return f"ALIE(z={self.z}, num_clients={self.num_clients}, omniscient={self.omniscient})"


class IPM:
    """Inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019): every row is ``-eps * mu``.

    ``mu`` is the mean of the honest updates (the attack is omniscient).  A small ``eps``
    (0.1 in the paper) hides inside the honest cloud and pulls median/Krum towards a
    non-descent direction; a large one (``eps = 100``) breaks the mean.  The inner product
    of the FedAvg aggregate with ``mu`` becomes ``(1 - p - p * eps) |mu|^2`` for a fraction
    ``p`` of attackers.
    """

    def __init__(self, *, eps: float = 0.1, omniscient: bool = True) -> None:
        self.eps = _positive("eps", eps)
        self.omniscient = bool(omniscient)

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray:
        rows = checked_rows(honest, num_byzantine)  # 25 x 1.2 M floats: no float64 copy
        return _tile(-self.eps * rows.mean(axis=0, dtype=np.float64), num_byzantine)

    def __repr__(self) -> str:
        return f"IPM(eps={self.eps})"
