"""Name -> update attack, as written in a scenario's ``attack`` field."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from securefl.aggregation.base import Aggregator
from securefl.attacks.mimic import Mimic
from securefl.attacks.optimized import AGRTailored, FangKrum, MinMax, MinSum
from securefl.attacks.poisoning import ALIE, IPM, GaussianNoise, Scaling, SignFlip

__all__ = ["ATTACKS", "UpdateAttack", "build_attack"]


class UpdateAttack(Protocol):
    """Produces the ``(f, d)`` byzantine rows from the ``(h, d)`` rows the attacker sees."""

    omniscient: bool

    def __call__(self, honest: np.ndarray, *, num_byzantine: int, rng: np.random.Generator,
                 aggregator: Aggregator | None = None) -> np.ndarray: ...


ATTACKS: dict[str, Callable[..., UpdateAttack]] = {
    "sign_flip": SignFlip,
    "gaussian": GaussianNoise,
    "scaling": Scaling,
    "alie": ALIE,
    "ipm": IPM,
    "min_max": MinMax,
    "min_sum": MinSum,
    "fang_krum": FangKrum,
    "agr_tailored": AGRTailored,
    "mimic": Mimic,
}


def build_attack(name: str, *, context: dict[str, Any] | None = None,
                 **options: Any) -> UpdateAttack:
    """Construct attack ``name`` with ``options``.

    ``context`` holds facts of the run (``num_clients``, ``server_lr``) that an attack's
    formula may need; each is passed only to attacks whose constructor takes it, and never
    overrides an explicit option.
    """
    try:
        factory = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r} (known: {', '.join(sorted(ATTACKS))})") from None
    accepted = inspect.signature(factory).parameters
    extra = {k: v for k, v in (context or {}).items() if k in accepted and k not in options}
    return factory(**extra, **options)
