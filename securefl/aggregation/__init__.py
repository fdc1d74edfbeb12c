"""Aggregation rules.  :func:`build_aggregator` maps a config ``rule`` name to an instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from securefl.aggregation.base import Aggregator, ReferenceRule, Rule, StatefulRule, as_rows
from securefl.aggregation.bucketing import Bucketing
from securefl.aggregation.bulyan import Bulyan
from securefl.aggregation.clipping import CenteredClipping, NormBound
from securefl.aggregation.fltrust import FLTrust
from securefl.aggregation.geometric import GeometricMedian
from securefl.aggregation.krum import Krum, MultiKrum
from securefl.aggregation.mean import FedAvg
from securefl.aggregation.median import Median, TrimmedMean
from securefl.aggregation.nnm import NNM
from securefl.aggregation.registry import INNER_RULES, construct

__all__ = [
    "NNM",
    "RULES",
    "Aggregator",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "FLTrust",
    "FedAvg",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "ReferenceRule",
    "Rule",
    "StatefulRule",
    "TrimmedMean",
    "as_rows",
    "build_aggregator",
]

#: rule name (as written in ``[aggregation] rule``) -> constructor taking keyword options
RULES: dict[str, Callable[..., Aggregator]] = {**INNER_RULES, "nnm": NNM,
                                                "bucketing": Bucketing}


def build_aggregator(rule: str, **options: Any) -> Aggregator:
    """Construct the aggregator called ``rule``; unknown names and bad options raise."""
    return construct(RULES, rule, **options)
