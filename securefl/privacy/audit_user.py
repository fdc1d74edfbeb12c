"""User-level audit of DP-FedAvg with canary clients, in the training run it audits.

Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar, "One-shot Empirical Privacy Estimation
for Federated Learning" (ICLR 2024): ``m`` *canary clients* each hold a fixed update
``G u_j``, ``u_j`` a random unit direction of the model space (``u_j = g / ||g||``,
``g ~ N(0, I_d)``; in high dimension the directions are nearly orthogonal to one another and
to the real task's updates).  Each canary is included independently with probability 1/2
(Steinke, Nasr & Jagielski, NeurIPS 2023, so that their one-run bound applies).  In every
round an included canary takes part with the sampling rate the server really uses
(``clients per round / clients``, read from the server's sampler), runs the library's
client step (:class:`~securefl.privacy.dp_fedavg.UserLevelTrainer`: clip to the current
``C``, weight 1) and its clipped update joins the round's sum *before* the server adds its
noise, so it is summed and noised exactly like a real user's.  ``G = 10 C`` by default, so a
pipeline that does not clip shows it.

The score of canary ``j`` is the cosine between the final model delta
``theta_T - theta_0`` and ``u_j`` (Andrew et al., Sec. 3; with the server's FedAvg step this
is the sum of every round's released aggregate, so it uses every round).  Two numbers come
out of the scores:

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

The instrumentation is audit-only: a server hook placed before the noise
(:class:`CanaryClients`); the canaries' trainers charge an unmetered ledger (the audit
accounts for them analytically above).  Distributed DP, once it exists, is audited the same
way: the canaries join the sum the distributed noise is added to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from securefl.config import Config, clients_per_round
from securefl.engine.protection import Combined, Rows, Update, WeightedSum
from securefl.errors import ConfigError
from securefl.privacy.audit import AuditReport, one_run_lower_bound

__all__ = ["USER_GUESS_FRACTIONS", "CanaryClients", "UserTamper", "gaussian_epsilon",
           "run_user_audit"]

#: guess fractions of the user-level bound: thousands of canaries, a weak per-canary signal,
#: so the few most extreme scores carry the evidence
USER_GUESS_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)

#: a planted fault for tests and benchmarks: called with the simulation and the canary
#: clients' trainers before training
UserTamper = Callable[[Any, Sequence[Any]], None]


class _Unmetered:
    """The canaries' ledger: charges nothing, remembers nothing (the audit accounts for the
    canaries itself, see the module docstring)."""

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def charge(self, *_args: Any, **_kwargs: Any) -> float:
        return 0.0

    def recall(self, *_args: Any) -> None:
        return None

    def remember(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class _FixedUpdate:
    """A canary's local training: always the update ``G u`` with ``G = factor * C`` (the
    server's current clipping bound)."""

    def __init__(self, direction: np.ndarray, factor: float, bound: Any) -> None:
        self.direction, self.factor, self.bound = direction, factor, bound

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        norm = np.float32(self.factor * self.bound.clip_norm)
        return Update(self.direction * norm, 1.0), {}


class CanaryClients:
    """Server hook before DP-FedAvg's noise: adds the clipped updates of the included canaries
    that take part in the round (each with the server's real sampling rate) to the sum."""

    def __init__(self, *, included: np.ndarray, rng: np.random.Generator) -> None:
        self.included, self.rng = included, rng
        self.trainers: list[Any] = []
        self.taken = np.zeros(len(included), dtype=np.int64)
        self.server: Any = None
        self.cap: int | None = None

    def attach(self, server: Any, trainers: Sequence[Any], *, cap: int | None) -> None:
        """The server whose sampler and model the canaries follow, their trainers (one per
        canary) and, under public sampling, the most rounds each may take part in."""
        if len(trainers) != len(self.included):
            raise ValueError(f"need {len(self.included)} canary trainers, got {len(trainers)}")
        self.server, self.trainers, self.cap = server, list(trainers), cap

    def rate(self) -> float:
        """``clients per round / clients`` of the server's sampler as it really is."""
        available = len(self.server.transport.client_ids())
        sampler = self.server.sampler
        k = clients_per_round(available, count=sampler.count, fraction=sampler.fraction)
        return k / available

    def transform_combined(self, combined: Combined, *, round: int,
                           rng: np.random.Generator) -> Combined:
        draw = self.rng.random(len(self.trainers)) < self.rate()
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
        for index in chosen:
            update, _ = self.trainers[index].fit(self.server.parameters, round=round)
            total += update.delta
        return WeightedSum(combined.client_ids, total, weight, combined.rejected)


def gaussian_epsilon(mean_out: float, std_out: float, mean_in: float, std_in: float, *,
                     delta: float) -> float:
    """ε at ``delta`` of distinguishing ``P = N(mean_in, std_in^2)`` from
    ``Q = N(mean_out, std_out^2)`` (Andrew et al. 2024, Sec. 3.1): the smallest ε with
    ``∫ max(0, p - e^ε q) <= delta`` and ``∫ max(0, q - e^ε p) <= delta`` (the hockey-stick
    divergence, on a grid of 200,001 points over 14 standard deviations either side);
    ``inf`` when none below 100 qualifies."""
    if not (std_out > 0 and std_in > 0 and 0 < delta < 1):
        return math.inf
    spread = max(std_out, std_in)
    grid = np.linspace(min(mean_out, mean_in) - 14 * spread,
                       max(mean_out, mean_in) + 14 * spread, 200_001)
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
    for _ in range(60):
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
                   norm_factor: float = 10.0, tamper: UserTamper | None = None
                   ) -> tuple[AuditReport, np.ndarray, np.ndarray]:
    """Train ``config`` (``[privacy] mode = "dp_fedavg"``) once with ``num_canaries`` canary
    clients and bound ε; the report, the cosine scores and the inclusion bits.

    ``tamper`` plants a fault (tests and benchmarks only)."""
    from securefl.engine.trainer import torch_threads
    from securefl.experiment import build_simulation
    from securefl.privacy.dp_fedavg import UserLevelTrainer

    if config.privacy.mode != "dp_fedavg":
        raise ConfigError(f"[privacy] canary clients audit user-level DP-FedAvg, not mode = "
                          f"{config.privacy.mode!r} (use --canary gradient)")
    if num_canaries < 2:
        raise ValueError(f"num_canaries must be at least 2, got {num_canaries}")
    rng = np.random.default_rng([config.run.seed, 0xA0D4])
    canaries = CanaryClients(included=rng.random(num_canaries) < 0.5,
                             rng=np.random.default_rng([config.run.seed, 0xA0D5]))
    simulation = build_simulation(config, server_hooks=[canaries])
    server, privacy = simulation.server, simulation.privacy
    noise = _noise_hook(server)
    start = server.parameters.astype(np.float64)
    directions = rng.standard_normal((num_canaries, start.size), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    event = next(iter(privacy.events.values()))
    ledger = _Unmetered(config.privacy.delta)
    trainers = [
        UserLevelTrainer(_FixedUpdate(direction, norm_factor, noise.clip),
                         client_id=f"canary-{j}", ledger=ledger,  # type: ignore[arg-type]
                         event=event, clip=noise.clip, sampling="public")
        for j, direction in enumerate(directions)]
    cap, spent = (_public_cap(config, event) if config.privacy.sampling == "public"
                  else (None, None))
    canaries.attach(server, trainers, cap=cap)
    if tamper is not None:
        tamper(simulation, canaries.trainers)
    try:
        with torch_threads(config.simulation.torch_threads()):
            server.run(config.run.rounds)
    finally:
        simulation.transport.close()
    moved = server.parameters.astype(np.float64) - start
    scores = directions @ moved / max(float(np.linalg.norm(moved)), 1e-300)
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
