"""User-level audit of DP-FedAvg with canary clients, in the training run it audits.

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy Estimation
for Federated Learning" (ICLR 2024): ``m`` *canary clients* each hold a fixed update
``G u_j``, ``u_j`` a random unit direction of the model space.  securefl draws ``u_j`` as
random signs, ``u_j = s_j / sqrt(d)`` with ``s_j`` uniform in ``{-1, +1}^d`` (stored as bits,
``d / 8`` bytes a canary), in place of the paper's uniform point of the sphere: in high
dimension both are nearly orthogonal to one another and to any fixed vector (cosine about
``N(0, 1/d)``), which is all the method uses.  Each canary is included independently with
probability 1/2
(Steinke, Nasr & Jagielski, NeurIPS 2023, so that their one-run bound applies).  In every
round an included canary takes part with the sampling rate the server really uses
(``clients per round / clients``, read from the server's sampler), takes the clients'
DP-FedAvg step (clipped to the bound ``C`` of the clients' clipping state by
:func:`~securefl.privacy.dp_fedavg.clip_factor`, weight 1) and its clipped update joins the
round's sum *before* the server adds its noise, so it is summed and noised exactly like a real
user's.  ``G = 10 C`` by default, so a pipeline that does not clip shows it.

The score of canary ``j`` is the cosine between ``u_j`` and
``sum_t (D_t - R_t / m) / ||D_t||``: the rounds' released aggregates ``D_t`` (the noised
mean update the server applies) less the real users' clipped sum ``R_t`` over the fixed
denominator ``m``, each round scaled by its norm.  ``R_t`` is a function of the released
model ``theta_{t-1}`` and of the real users' data and sample, which the one-run theorem holds
fixed (they do not depend on which canaries are included), so the score is a
post-processing of the releases.  Andrew et al. (Sec. 3) score either the final model delta or each
round's aggregate; summing the unit-norm rounds uses every round and weighs each alike,
whatever the adaptive clipping bound (and so the noise) was in it, where the final delta
would let the rounds with the largest bound drown the others.  Two numbers come out of the
scores:

* the *estimate* ``eps_hat`` of Andrew et al.: the cosines of included and of excluded
  canaries are each fitted with a Gaussian, and ``eps_hat`` is the ε at δ of the pair
  (:func:`gaussian_epsilon`).  It is an estimate, not a bound: it assumes the fit is right.
* the one-run *lower bound* (:func:`securefl.privacy.audit.one_run_lower_bound`), valid at
  the chosen confidence whatever the score distribution; this is what ``--gate`` uses.

Each canary is one user: adding or removing it changes one user's data.  Under
``sampling = "secret"`` it is sampled with probability ``q`` in each round, as the
accountant assumes of every user, so under the accountant's (ε, δ) every canary is
(ε, δ)-DP.  Under ``sampling = "public"`` (``q = 1`` per round taken part in) a canary takes
part only while its own composition fits the budget, like a real client, and the compared ε
is the larger of the ledger's and the canaries' own.  Canaries report no clipped-count bit
(releasing less than a real user), so adaptive clipping follows the real users only.

The instrumentation is audit-only: a server hook placed just before the noise
(:class:`CanaryClients`, which works on the canaries' packed sign bits, so that thousands
of them cost a fraction of the training run); the library's DP path is not changed.
Distributed DP, once it exists, is audited the same way: the canaries join the sum the
distributed noise is added to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from securefl.config import Config, clients_per_round
from securefl.engine.history import RoundRecord
from securefl.engine.protection import Rows, WeightedSum
from securefl.errors import ConfigError
from securefl.privacy.audit import AuditReport, one_run_lower_bound

__all__ = ["USER_GUESS_FRACTIONS", "CanaryClients", "UserTamper", "gaussian_epsilon",
           "run_user_audit"]

#: guess fractions of the user-level bound: thousands of canaries, a weak per-canary signal,
#: so the few most extreme scores carry the evidence
USER_GUESS_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)

#: a planted fault for tests and benchmarks: called with the simulation and the canary
#: clients before training
UserTamper = Callable[[Any, "CanaryClients"], None]


#: bit ``k`` of byte value ``b`` at ``[b, k]``, in :func:`numpy.unpackbits` order
_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, np.newaxis], axis=1)


class CanaryClients:
    """Server hook before DP-FedAvg's noise: the included canaries that take part in the round
    (each with the server's real sampling rate) take the clients' DP-FedAvg step and their
    clipped updates join the round's sum with weight 1 each.

    Canary ``j``'s update is ``G u_j``, ``G = factor * C`` (``C`` the server's current bound)
    and ``u_j = (2 b_j - 1) / sqrt(d)`` for its sign bits ``b_j``; every one has norm ``G``,
    so the clients' clipping step scales each by ``clip_factor(G, C')``
    (:func:`~securefl.privacy.dp_fedavg.clip_factor`, ``C'`` the bound of the clients'
    clipping state ``clip``), and the round's canaries add
    ``clip_factor(G, C') G / sqrt(d) (2 n - k)``, ``n`` the count of set bits per coordinate
    among the ``k`` taking part.  Both that count and the cosines are computed on the packed
    bits a byte (8 coordinates) at a time."""

    def __init__(self, signs: np.ndarray, *, dimension: int, included: np.ndarray,
                 factor: float, rng: np.random.Generator) -> None:
        if signs.shape != (len(included), (dimension + 7) // 8) or signs.dtype != np.uint8:
            raise ValueError("need one packed row of sign bits per canary")
        self.signs, self.dimension, self.included = signs, dimension, included
        self.factor, self.rng = factor, rng
        self.unit = 1 / math.sqrt(dimension)
        self.taken = np.zeros(len(included), dtype=np.int64)
        self.server: Any = None
        self.clip: Any = None  # the clients' clipping state (what they clip to)
        self.bound: Any = None  # the server's (what it noises for)
        self.cap: int | None = None
        self.released = np.zeros(dimension)  # sum of the rounds' unit-norm canary releases
        self.denominator = 1.0  # the server's fixed denominator m
        self.users = np.zeros(dimension)  # the real users' clipped sum of the round

    def attach(self, server: Any, noise: Any, *, cap: int | None) -> None:
        """The server whose sampler the canaries follow, its DP-FedAvg noise (shared clipping
        state, fixed denominator) and, under public sampling, the most rounds a canary may
        take part in."""
        self.server, self.clip, self.bound, self.cap = server, noise.clip, noise.clip, cap
        self.denominator = float(noise.expected_clients)

    def rate(self) -> float:
        """``clients per round / clients`` of the server's sampler as it really is."""
        available = len(self.server.transport.client_ids())
        sampler = self.server.sampler
        k = clients_per_round(available, count=sampler.count, fraction=sampler.fraction)
        return k / available

    def directions(self, index: np.ndarray) -> np.ndarray:
        """The unit directions ``u_j`` (rows, float64) of the canaries ``index``."""
        bits = np.unpackbits(self.signs[index], axis=1, count=self.dimension)
        return (2.0 * bits - 1.0) * self.unit

    def set_bits(self, index: np.ndarray) -> np.ndarray:
        """Per coordinate, how many of the canaries ``index`` have sign bit 1."""
        columns = self.signs.shape[1]
        keys = (np.arange(columns) * 256 + self.signs[index]).ravel()
        histogram = np.bincount(keys, minlength=columns * 256).reshape(columns, 256)
        return (histogram @ _BITS).reshape(-1)[:self.dimension]

    def cosines(self, vector: np.ndarray) -> np.ndarray:
        """``cos(vector, u_j)`` of every canary: ``(2 b_j . v - sum v) / (sqrt(d) ||v||)``."""
        columns = self.signs.shape[1]
        padded = np.zeros(columns * 8)
        padded[:self.dimension] = vector
        table = _BITS @ padded.reshape(columns, 8).T  # [byte, column]: its bits' sum of v
        dots = table[self.signs, np.arange(columns)].sum(axis=1)
        norm = max(float(np.linalg.norm(padded)), 1e-300)
        return (2 * dots - padded.sum()) * self.unit / norm

    def transform_combined(self, combined: Rows | WeightedSum, *, round: int,
                           rng: np.random.Generator) -> Rows | WeightedSum:
        from securefl.privacy.dp_fedavg import clip_factor

        draw = self.rng.random(len(self.included)) < self.rate()
        if self.cap is not None:  # "public": a canary over its budget declines, as a user does
            draw &= self.taken < self.cap
        chosen = np.flatnonzero(draw & self.included)
        self.taken[chosen] += 1
        if isinstance(combined, Rows):
            total = combined.updates.astype(np.float64).sum(axis=0)
            weight = float(len(combined.client_ids))
        elif isinstance(combined, WeightedSum):
            total, weight = np.array(combined.total, dtype=np.float64), combined.total_weight
        else:
            raise TypeError("canary clients join a sum in the clear or a secure sum")
        self.users = total.copy()
        norm = self.factor * self.bound.clip_norm
        scale = clip_factor(norm, self.clip.clip_norm) * norm * self.unit
        total += scale * (2.0 * self.set_bits(chosen) - len(chosen))
        return WeightedSum(combined.client_ids, total, weight, combined.rejected)

    def transform_aggregate(self, delta: np.ndarray, *, round: int, num_clients: int,
                            rng: np.random.Generator) -> np.ndarray:
        """Adds the round's released aggregate less the real users' part, ``D_t - R_t / m``,
        scaled by ``1 / ||D_t||``, to :attr:`released`."""
        released = delta.astype(np.float64)
        norm = float(np.linalg.norm(released))
        if norm > 0:
            self.released += (released - self.users / self.denominator) / norm
        return delta


def gaussian_epsilon(mean_out: float, std_out: float, mean_in: float, std_in: float, *,
                     delta: float) -> float:
    """ε at ``delta`` of distinguishing ``P = N(mean_in, std_in^2)`` from
    ``Q = N(mean_out, std_out^2)`` (Andrew et al. 2024, Sec. 3.1): the smallest ε with
    ``∫ max(0, p - e^ε q) <= delta`` and ``∫ max(0, q - e^ε p) <= delta`` (the hockey-stick
    divergence, on a grid of 40,001 points over 14 standard deviations either side);
    ``inf`` when none below 100 qualifies."""
    if not (std_out > 0 and std_in > 0 and 0 < delta < 1):
        return math.inf
    spread = max(std_out, std_in)
    grid = np.linspace(min(mean_out, mean_in) - 14 * spread,
                       max(mean_out, mean_in) + 14 * spread, 40_001)
    step = grid[1] - grid[0]
    log_p = stats.norm.logpdf(grid, mean_in, std_in)
    log_q = stats.norm.logpdf(grid, mean_out, std_out)

    def hockey(eps: float) -> float:
        one = np.exp(log_p) - np.exp(np.minimum(log_q + eps, 700.0))
        two = np.exp(log_q) - np.exp(np.minimum(log_p + eps, 700.0))
        return float(max(np.clip(one, 0, None).sum(), np.clip(two, 0, None).sum()) * step)

    if hockey(0.0) <= delta:
        return 0.0
    low, high = 0.0, 100.0
    if hockey(high) > delta:
        return math.inf
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if hockey(middle) > delta else (low, middle)
    return high


def _noise_hook(server: Any) -> Any:
    from securefl.privacy.dp_fedavg import UserLevelNoise

    found = [hook for hook in server.hooks if isinstance(hook, UserLevelNoise)]
    if len(found) != 1:
        raise ConfigError("[privacy] the user-level audit needs DP-FedAvg's server noise")
    return found[0]


def _public_cap(config: Config, event: Any) -> tuple[int | None, Callable[[int], float]]:
    """Under ``sampling = "public"``: the most rounds a canary may take part in within the
    budget (``None``: no budget) and ε of ``k`` rounds."""
    from securefl.privacy.accounting import epsilon

    privacy = config.privacy

    def spent(k: int) -> float:
        return epsilon([event] * k, delta=privacy.delta, accountant=privacy.accountant)

    budget = privacy.epsilon_budget
    if budget is None:
        return None, spent
    cap = 0
    while cap < config.run.rounds and spent(cap + 1) <= budget:
        cap += 1
    return cap, spent


def run_user_audit(config: Config, *, num_canaries: int = 5000, confidence: float = 0.95,
                   norm_factor: float = 10.0, tamper: UserTamper | None = None,
                   on_round: Callable[[RoundRecord], None] | None = None
                   ) -> tuple[AuditReport, np.ndarray, np.ndarray]:
    """Train ``config`` (``[privacy] mode = "dp_fedavg"``) once with ``num_canaries`` canary
    clients and bound ε; the report, the cosine scores and the inclusion bits.

    ``tamper`` plants a fault (tests and benchmarks only); ``on_round`` is called after each
    round (progress)."""
    from securefl.engine.trainer import torch_threads
    from securefl.simulation import build_simulation

    if config.privacy.mode != "dp_fedavg":
        raise ConfigError(f"[privacy] canary clients audit user-level DP-FedAvg, not mode = "
                          f"{config.privacy.mode!r} (use --canary gradient)")
    if num_canaries < 2:
        raise ValueError(f"num_canaries must be at least 2, got {num_canaries}")
    rng = np.random.default_rng([config.run.seed, 0xA0D4])
    included = rng.random(num_canaries) < 0.5
    simulation = build_simulation(config, server_hooks=())
    server, privacy = simulation.server, simulation.privacy
    noise = _noise_hook(server)
    size = server.parameters.size
    signs = np.frombuffer(rng.bytes(num_canaries * ((size + 7) // 8)), dtype=np.uint8)
    canaries = CanaryClients(signs.reshape(num_canaries, -1), dimension=size,
                             included=included, factor=norm_factor,
                             rng=np.random.default_rng([config.run.seed, 0xA0D5]))
    server.hooks.insert(server.hooks.index(noise), canaries)
    event = next(iter(privacy.events.values()))
    cap, spent = (_public_cap(config, event) if config.privacy.sampling == "public"
                  else (None, None))
    canaries.attach(server, noise, cap=cap)
    if tamper is not None:
        tamper(simulation, canaries)
    try:
        with torch_threads(config.simulation.torch_threads()):
            server.run(config.run.rounds, on_round=on_round)
    finally:
        simulation.transport.close()
    scores = canaries.cosines(canaries.released)
    included = canaries.included
    accountant = privacy.largest_epsilon()
    if spent is not None:
        accountant = max(accountant, spent(int(canaries.taken.max())))
    delta = config.privacy.delta
    bound = one_run_lower_bound(scores, included, delta=delta, confidence=confidence,
                                guess_fractions=USER_GUESS_FRACTIONS)
    estimate = gaussian_epsilon(float(scores[~included].mean()), float(scores[~included].std()),
                                float(scores[included].mean()), float(scores[included].std()),
                                delta=delta)
    accuracy = simulation.evaluator(server.parameters)[2]
    report = AuditReport(bound.epsilon, accountant, delta, confidence, bound.method,
                         num_canaries, int(included.sum()), bound.num_guesses,
                         bound.num_correct, float(accuracy), canary="client",
                         epsilon_estimate=estimate)
    return report, scores, included
