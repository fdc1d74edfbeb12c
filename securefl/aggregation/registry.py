"""The rules by name, as ``[aggregation] rule`` writes them, and their construction.

:data:`INNER_RULES` holds every rule that can sit inside :class:`~securefl.aggregation.nnm.NNM`
(all but ``nnm`` itself); :data:`securefl.aggregation.RULES` adds ``nnm``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from securefl.aggregation.base import Aggregator
from securefl.aggregation.bulyan import Bulyan
from securefl.aggregation.clipping import CenteredClipping, NormBound
from securefl.aggregation.fltrust import FLTrust
from securefl.aggregation.geometric import GeometricMedian
from securefl.aggregation.krum import Krum, MultiKrum
from securefl.aggregation.mean import FedAvg
from securefl.aggregation.median import Median, TrimmedMean

__all__ = ["INNER_RULES", "construct"]

#: rule name -> constructor taking keyword options (every rule but ``nnm``)
INNER_RULES: dict[str, Callable[..., Aggregator]] = {
    "fedavg": FedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "bulyan": Bulyan,
    "geometric_median": GeometricMedian,
    "centered_clipping": CenteredClipping,
    "norm_bound": NormBound,
    "fltrust": FLTrust,
}


def construct(rules: Mapping[str, Callable[..., Aggregator]], rule: str,
              **options: Any) -> Aggregator:
    """Construct the rule called ``rule`` from ``rules``; unknown names and bad options
    raise, in the config's words."""
    try:
        factory = rules[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r} (known: {', '.join(sorted(rules))})") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise TypeError(_option_problem(factory, options) or str(exc)) from None


def _option_problem(factory: Callable[..., Aggregator], options: dict[str, Any]) -> str | None:
    """``factory``'s signature against ``options``, in the config's words."""
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
