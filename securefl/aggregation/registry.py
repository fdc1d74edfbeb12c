"""The rules by name, as ``[aggregation] rule`` writes them, and their construction.

:data:`INNER_RULES` holds every rule that can sit inside a wrapper
(:class:`~securefl.aggregation.nnm.NNM`, :class:`~securefl.aggregation.bucketing.Bucketing`);
:data:`securefl.aggregation.RULES` adds the wrappers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from securefl.aggregation.base import Aggregator, Rule
from securefl.aggregation.bulyan import Bulyan
from securefl.aggregation.clipping import CenteredClipping, NormBound
from securefl.aggregation.fltrust import FLTrust
from securefl.aggregation.geometric import GeometricMedian
from securefl.aggregation.krum import Krum, MultiKrum, check_num_byzantine
from securefl.aggregation.mean import FedAvg
from securefl.aggregation.median import Median, TrimmedMean

__all__ = ["INNER_RULES", "WRAPPERS", "build_inner", "construct"]

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


#: the rules that wrap an inner rule (registered in :data:`securefl.aggregation.RULES`)
WRAPPERS = ("nnm", "bucketing")


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


def build_inner(inner: Aggregator | str | Mapping[str, Any], num_byzantine: int, *,
                outer: str) -> Aggregator:
    """The inner rule of a wrapper (``outer``: NNM, bucketing) from an instance, a rule name,
    or a ``{rule = ..., option = ...}`` table.

    From a name or table, ``num_byzantine`` is passed on when the inner rule takes it and the
    table does not set it.
    """
    if isinstance(inner, str):
        inner = {"rule": inner}
    if not isinstance(inner, Mapping):
        if not callable(inner):
            raise TypeError(f"inner must be an aggregator, a rule name or a table, got {inner!r}")
        return inner
    options = dict(inner)
    rule = options.pop("rule", None)
    if not isinstance(rule, str) or rule in WRAPPERS:
        raise ValueError(f"{outer}'s inner needs a rule name other than "
                         f"{' or '.join(map(repr, WRAPPERS))}, got {rule!r}")
    factory = INNER_RULES.get(rule)
    if factory is not None and "num_byzantine" in inspect.signature(factory).parameters:
        options.setdefault("num_byzantine", num_byzantine)
    return construct(INNER_RULES, rule, **options)


class Wrapper(Rule):
    """A rule that reshapes the rows for an inner rule (NNM, bucketing): it is stateful, and
    needs the server's reference update, exactly when its inner rule is and does."""

    inner: Aggregator

    def _wrap(self, inner: Aggregator | str | Mapping[str, Any], num_byzantine: int, *,
              outer: str) -> None:
        self.num_byzantine = check_num_byzantine(num_byzantine)
        self.inner = build_inner(inner, self.num_byzantine, outer=outer)

    @property
    def stateful(self) -> bool:
        return self.inner.stateful

    @property
    def needs_reference(self) -> bool:
        return self.inner.needs_reference


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
