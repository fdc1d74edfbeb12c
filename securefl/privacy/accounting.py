"""Privacy accounting over immutable events, by Opacus's accountants only.

An :class:`PrivacyEvent` is one application, ``steps`` times, of the Poisson-subsampled
Gaussian mechanism with noise multiplier ``sigma`` and sample rate ``q``: a DP-SGD round
(``q = 1 / batches per epoch``, ``steps = epochs * batches``; Abadi et al., CCS 2016) or a
DP-FedAvg round (``q = clients per round / clients``, ``steps = 1``; McMahan et al., ICLR 2018).

The epsilon of a sequence of events at a given delta is computed by feeding their history to
Opacus's :class:`~opacus.accountants.RDPAccountant` (Mironov, CSF 2017; Mironov et al. 2019)
or :class:`~opacus.accountants.PRVAccountant` (Gopi et al., NeurIPS 2021).  Consecutive
events with the same ``(sigma, q)`` are merged into one history entry, exactly as the
accountants' own ``step()`` does, so composing per round gives bit-for-bit the epsilon of one
accountant run over the same steps.  No formula is written here.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "PrivacyEvent",
    "compose",
    "epsilon",
    "rdp_per_step",
]

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "prv")
MECHANISMS = ("dp_sgd", "dp_fedavg")


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` compositions of the subsampled Gaussian mechanism ``(sigma, q)``."""

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, "
                             f"got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")


def compose(events: Iterable[PrivacyEvent]) -> list[tuple[float, float, int]]:
    """The Opacus accountant history ``[(sigma, q, steps), ...]`` of ``events`` in order."""
    history: list[tuple[float, float, int]] = []
    for event in events:
        sigma, q = float(event.noise_multiplier), float(event.sample_rate)
        if history and history[-1][0] == sigma and history[-1][1] == q:
            history[-1] = (sigma, q, history[-1][2] + event.steps)
        else:
            history.append((sigma, q, event.steps))
    return history


def _accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")


def epsilon(events: Iterable[PrivacyEvent], *, delta: float,
            accountant: AccountantName = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 for no events).

    PRV returns Opacus's upper bound (``eps_upper``); RDP the best conversion over Opacus's
    default orders.  An unbounded result is ``inf``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return _epsilon_of(tuple(compose(events)), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus's ``compute_rdp(q, sigma, steps=1)`` over the RDP accountant's default orders,
    cached per ``(q, sigma)``; ``compute_rdp(steps)`` is this curve times ``steps``."""
    return np.asarray(rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS))


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """:meth:`RDPAccountant.get_privacy_spent` step for step, with the per-step RDP curve of
    each ``(sigma, q)`` cached: Opacus computes ``compute_rdp(steps) = curve * steps``, and
    the curve is the expensive part (the ledger recomposes every charge)."""
    rdp = sum([rdp_per_step(q, sigma) * steps for sigma, q, steps in history])
    value, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                              delta=delta)
    return float(value)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float,
                accountant: str) -> float:
    if not history:
        return 0.0
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": the bound is still valid, only less tight
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # PRV's log(1 - q) at q = 1
        try:
            if accountant == "rdp":
                value = _rdp_epsilon(history, delta)
            else:
                account = _accountant(accountant)
                account.history = list(history)
                value = float(account.get_epsilon(delta=delta))
        except (ValueError, OverflowError, FloatingPointError):
            # the PRV domain cannot be built for a privacy loss this large
            return math.inf
    return value if math.isfinite(value) and value >= 0 else math.inf
