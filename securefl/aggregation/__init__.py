"""Aggregation rules.  :func:`build_aggregator` maps a config ``rule`` name to an instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from securefl.aggregation.base import Aggregator, as_rows
from securefl.aggregation.mean import FedAvg

__all__ = ["RULES", "Aggregator", "FedAvg", "as_rows", "build_aggregator"]

#: rule name (as written in ``[aggregation] rule``) -> constructor taking keyword options
RULES: dict[str, Callable[..., Aggregator]] = {
    "fedavg": FedAvg,
}


def build_aggregator(rule: str, **options: Any) -> Aggregator:
    """Construct the aggregator called ``rule``; unknown names and bad options raise."""
    try:
        factory = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r} (known: {', '.join(sorted(RULES))})") from None
    return factory(**options)
