"""Empirical privacy audit: an ε lower bound from canaries, next to the accountant's ε.

Two statistical tests turn canary membership scores into a lower bound that holds with
probability ``confidence`` if the training run is (ε, δ)-DP:

* :func:`one_run_lower_bound` - Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
  Training Run" (NeurIPS 2023).  ``m`` canaries are each included independently with
  probability 1/2; the auditor guesses IN for the ``k+`` highest scores and OUT for the ``k-``
  lowest.  Under (ε, δ)-DP the number ``v`` of correct guesses among ``r = k+ + k-`` satisfies
  (their Thm. 5.2) ``P[V ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2 m δ max_{i ≤ v} P[v > B ≥ v - i] / i``
  with ``p_ε = e^ε / (1 + e^ε)``.  The bound is the largest ε whose p-value is below
  ``1 - confidence``; several guess counts are tried with a Bonferroni correction so that
  picking the best one keeps the guarantee.
* :func:`clopper_pearson_lower_bound` - Jagielski, Ullman & Oprea, "Auditing Differentially
  Private Machine Learning: How Private is Private SGD?" (NeurIPS 2020): over repeated runs
  with and without one canary, an (ε, δ)-DP algorithm has ``FPR + e^ε FNR ≥ 1 - δ`` and
  ``FNR + e^ε FPR ≥ 1 - δ`` for every threshold test, so with Clopper-Pearson upper bounds
  ``ε ≥ max(log((1 - δ - FNR⁺) / FPR⁺), log((1 - δ - FPR⁺) / FNR⁺))``.  The threshold is
  chosen on one half of the runs and the bound computed on the other half.

:func:`insert_canaries` makes mislabelled input canaries; the audits that train with canaries
live with the attack suite (:mod:`securefl.attacks.audit`, ``securefl privacy audit``):
``--canary input`` scores them by their logit-scaled confidence in the canary label (weak: on
the shipped configurations it bounds nothing, 0.0); by default the audit follows the config's
DP mode, ``--canary gradient`` (DP-SGD or no DP, :mod:`securefl.attacks.audit_gradient`) or
``--canary client`` (DP-FedAvg, :mod:`securefl.attacks.audit_user`).  ``--gate`` turns any of
them into a check: exit 1 when the lower bound exceeds the accountant's ε
(:func:`gate_fails`), evidence that the pipeline does not deliver what it accounts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from securefl.data import ClientData, Dataset, FederatedData

__all__ = [
    "AuditBound",
    "AuditReport",
    "clopper_pearson_lower_bound",
    "gate_fails",
    "insert_canaries",
    "one_run_lower_bound",
    "one_run_p_value",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditBound:
    """An ε lower bound and the evidence behind it."""

    epsilon: float
    num_guesses: int
    num_correct: int
    confidence: float
    method: str


def one_run_p_value(*, num_canaries: int, num_guesses: int, num_correct: int,
                    epsilon: float, delta: float) -> float:
    """P-value of ``num_correct`` or more correct guesses under (ε, δ)-DP (Steinke et al.
    2023, Thm. 5.2): ``β + 2 m δ α`` with ``β = P[B ≥ v]``, ``B ~ Binomial(r, e^ε/(1+e^ε))``
    and ``α = max_{1 ≤ i ≤ v} P[v - i ≤ B < v] / i``."""
    m, r, v = num_canaries, num_guesses, num_correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, p))
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))  # P[v-i <= B < v]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def _largest_epsilon(p_value: Callable[[float], float], significance: float) -> float:
    """Largest ε with ``p_value(ε) < significance`` (p-values grow with ε), by bisection."""
    if p_value(0.0) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(high) < significance:
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(50):
        middle = (low + high) / 2
        if p_value(middle) < significance:
            low = middle
        else:
            high = middle
    return low


def one_run_lower_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                        confidence: float = 0.95,
                        guess_fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
                        ) -> AuditBound:
    """ε lower bound from one training run (Steinke, Nasr & Jagielski 2023, Alg. 1).

    ``scores`` ``(m,)``: higher means "more likely trained on"; ``included`` ``(m,)``: which
    canaries were inserted (each independently with probability 1/2).  For each fraction
    ``f`` the auditor guesses IN for the top ``f m / 2`` and OUT for the bottom ``f m / 2``
    scores; the best bound over fractions is reported at significance
    ``(1 - confidence) / len(guess_fractions)`` (Bonferroni).
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != truth.shape or len(s) < 2:
        raise ValueError(f"scores and included must be (m,) with m >= 2, got {s.shape}, "
                         f"{truth.shape}")
    if not 0 < confidence < 1 or not guess_fractions:
        raise ValueError("confidence must be in (0, 1) and guess_fractions non-empty")
    m = len(s)
    order = np.argsort(s, kind="stable")
    significance = (1 - confidence) / len(guess_fractions)
    best = AuditBound(0.0, 0, 0, confidence, "one_run")
    for fraction in guess_fractions:
        half = max(1, int(fraction * m / 2))
        correct = int(truth[order[-half:]].sum() + (~truth[order[:half]]).sum())
        r = 2 * half

        def p_value(eps: float, r: int = r, correct: int = correct) -> float:
            return one_run_p_value(num_canaries=m, num_guesses=r, num_correct=correct,
                                   epsilon=eps, delta=delta)

        epsilon = _largest_epsilon(p_value, significance)
        if epsilon > best.epsilon or best.num_guesses == 0:
            best = AuditBound(epsilon, r, correct, confidence, "one_run")
    return best


def _clopper_pearson_upper(failures: int, trials: int, confidence: float) -> float:
    if failures >= trials:
        return 1.0
    return float(stats.beta.ppf(confidence, failures + 1, trials - failures))


def clopper_pearson_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, *,
                                delta: float, confidence: float = 0.95) -> AuditBound:
    """ε lower bound over repeated runs (Jagielski et al. 2020) from the canary's score in
    runs that trained on it (``scores_in``) and runs that did not (``scores_out``).

    The first half of each array picks the threshold with the best bound there; FPR and FNR
    on the second half get one-sided Clopper-Pearson upper bounds at
    ``1 - (1 - confidence) / 2`` each (union bound).
    """
    s_in = np.asarray(scores_in, dtype=np.float64)
    s_out = np.asarray(scores_out, dtype=np.float64)
    if s_in.ndim != 1 or s_out.ndim != 1 or min(len(s_in), len(s_out)) < 4:
        raise ValueError("need at least 4 runs with and 4 without the canary")
    split_in, split_out = len(s_in) // 2, len(s_out) // 2
    level = 1 - (1 - confidence) / 2

    def bound(threshold: float, held_in: np.ndarray,
              held_out: np.ndarray) -> tuple[float, int, int]:
        false_pos = int((held_out >= threshold).sum())
        false_neg = int((held_in < threshold).sum())
        fpr = _clopper_pearson_upper(false_pos, len(held_out), level)
        fnr = _clopper_pearson_upper(false_neg, len(held_in), level)
        values = [math.log((1 - delta - a) / b) for a, b in ((fnr, fpr), (fpr, fnr))
                  if b > 0 and 1 - delta - a > 0]
        correct = len(held_in) + len(held_out) - false_pos - false_neg
        return max([0.0, *values]), len(held_in) + len(held_out), correct

    candidates = np.unique(np.concatenate([s_in[:split_in], s_out[:split_out]]))
    threshold = max(candidates, key=lambda t: bound(t, s_in[:split_in], s_out[:split_out])[0])
    epsilon, trials, correct = bound(threshold, s_in[split_in:], s_out[split_out:])
    return AuditBound(epsilon, trials, correct, confidence, "clopper_pearson")


# ----------------------------------------------------------------------------- the audit run
@dataclass(frozen=True)
class AuditReport:
    """The empirical lower bound next to the accountant's ε (``inf`` when non-private)."""

    epsilon_lower_bound: float
    accountant_epsilon: float
    delta: float
    confidence: float
    method: str
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int
    test_accuracy: float
    canary: str = "input"
    #: Andrew et al.'s Gaussian-fit estimate (user-level audit only); not a bound
    epsilon_estimate: float | None = None

    def to_json(self) -> dict[str, float | int | str | None]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def insert_canaries(data: FederatedData, *, num_canaries: int,
                    rng: np.random.Generator) -> tuple[FederatedData, Dataset, np.ndarray]:
    """Mislabelled canaries drawn from the held-out set, each inserted with probability 1/2
    into the training split of a uniformly chosen client (Steinke et al. 2023, Sec. 6).

    Returns the federation with canaries, the canaries (with their wrong labels) and the
    boolean inclusion vector.  The canaries are removed from the test set.
    """
    test = data.test
    if not 2 <= num_canaries < len(test):
        raise ValueError(f"num_canaries must be in [2, {len(test)}) (the held-out set size), "
                         f"got {num_canaries}")
    order = rng.permutation(len(test))
    picked, rest = order[:num_canaries], np.sort(order[num_canaries:])
    shift = rng.integers(1, data.num_classes, size=num_canaries)
    canaries = Dataset(test.features[picked], (test.labels[picked] + shift) % data.num_classes,
                       data.num_classes, f"{test.name}-canaries")
    included = rng.random(num_canaries) < 0.5
    owner = rng.integers(len(data.clients), size=num_canaries)
    clients = {}
    for index, (cid, shard) in enumerate(data.clients.items()):
        mine = np.flatnonzero(included & (owner == index))
        train = Dataset(np.concatenate([shard.train.features, canaries.features[mine]]),
                        np.concatenate([shard.train.labels, canaries.labels[mine]]),
                        data.num_classes, shard.train.name)
        clients[cid] = ClientData(train, shard.val)
    federation = FederatedData(clients, test.subset(rest), data.num_classes, data.shape)
    return federation, canaries, included


def gate_fails(report: AuditReport) -> bool:
    """The gate: the empirical lower bound exceeds the accountant's ε.  If the run were
    (ε, δ)-DP this happens with probability at most ``1 - confidence``."""
    return report.epsilon_lower_bound > report.accountant_epsilon


def write_score_plot(scores: np.ndarray, included: np.ndarray, path: Path, *,
                     title: str) -> Path:
    """Histogram of the canary scores, inserted (IN) against not inserted (OUT)."""
    from securefl.output import pyplot, save_figure

    figure, axes = pyplot().subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=40)
    axes.hist(scores[included], bins=bins, alpha=0.6, label=f"in ({int(included.sum())})")
    axes.hist(scores[~included], bins=bins, alpha=0.6, label=f"out ({int((~included).sum())})")
    axes.set_xlabel("canary score")
    axes.set_ylabel("canaries")
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)
