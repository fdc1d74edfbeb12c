"""Aggregation rules.  :func:`build_aggregator` maps a config ``rule`` name to an instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from securefl.aggregation.base import Aggregator, as_rows
from securefl.aggregation.bulyan import Bulyan
from securefl.aggregation.clipping import CenteredClipping, NormBound
from securefl.aggregation.fltrust import FLTrust
from securefl.aggregation.geometric import GeometricMedian
from securefl.aggregation.krum import Krum, MultiKrum
from securefl.aggregation.mean import FedAvg
from securefl.aggregation.median import Median, TrimmedMean
from securefl.aggregation.nnm import NNM

__all__ = [
    "NNM",
    "RULES",
    "Aggregator",
    "Bulyan",
    "CenteredClipping",
    "FLTrust",
    "FedAvg",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "TrimmedMean",
    "as_rows",
    "build_aggregator",
    "min_clients",
]

#: rule name (as written in ``[aggregation] rule``) -> constructor taking keyword options
RULES: dict[str, Callable[..., Aggregator]] = {
    "fedavg": FedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "bulyan": Bulyan,
    "geometric_median": GeometricMedian,
    "centered_clipping": CenteredClipping,
    "norm_bound": NormBound,
    "nnm": NNM,
    "fltrust": FLTrust,
}


def min_clients(aggregator: Aggregator) -> int:
    """The fewest updates ``aggregator`` can combine (its byzantine bound, e.g. Krum's
    ``2f + 3``); 1 for rules without one."""
    return int(getattr(aggregator, "min_clients", 1))


def build_aggregator(rule: str, **options: Any) -> Aggregator:
    """Construct the aggregator called ``rule``; unknown names and bad options raise."""
    try:
        factory = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r} (known: {', '.join(sorted(RULES))})") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise TypeError(_option_problem(rule, factory, options) or str(exc)) from None


def _option_problem(rule: str, factory: Callable[..., Aggregator],
                    options: dict[str, Any]) -> str | None:
    """``factory``'s signature against ``options``, in the config's words."""
    import inspect

    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        allowed = ", ".join(sorted(parameters)) or "none"
        return f"unknown option(s) {', '.join(unknown)} (allowed: {allowed})"
    missing = [name for name, p in parameters.items()
               if p.default is inspect.Parameter.empty and name not in options
               and p.kind is not inspect.Parameter.VAR_KEYWORD]
    if missing:
        return f"needs option(s) {', '.join(missing)} in [aggregation]"
    return None
