"""Threat models and the configuration checker.

A threat model (``threat_models/*.toml``, see :mod:`securefl.threat.model`) lists the controls
it requires; :func:`check_config` checks each against a run configuration and says, per
requirement, whether it holds and why.  :func:`require` is what ``securefl run`` and
``securefl server`` call first: when the config names a threat model (``[run] threat_model``)
and any requirement fails, it raises :class:`~securefl.errors.ConfigError` listing every
failure, and nothing starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefl.aggregation import Aggregator
from securefl.errors import ConfigError
from securefl.threat.controls import CONTROLS
from securefl.threat.facts import Facts, facts
from securefl.threat.model import (
    Adversary,
    Requirement,
    ThreatModel,
    available_threat_models,
    load_threat_model,
    parse_threat_model,
)

__all__ = [
    "Adversary",
    "CheckResult",
    "Facts",
    "Requirement",
    "ThreatModel",
    "available_threat_models",
    "check_config",
    "load_threat_model",
    "parse_threat_model",
    "require",
]

DEPLOYMENTS = ("simulation", "network")


@dataclass(frozen=True)
class CheckResult:
    """One requirement checked against one config."""

    requirement: Requirement
    passed: bool
    reason: str

    @property
    def id(self) -> str:
        return self.requirement.id

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.id}: {self.reason}"


def check_config(config: Any, threat_model: ThreatModel | str | Path, *,
                 deployment: str = "simulation",
                 aggregator: Aggregator | None = None) -> list[CheckResult]:
    """Check every requirement of ``threat_model`` (a model, a shipped name or a TOML path)
    against ``config``; ``deployment`` is ``"simulation"`` (``securefl run``) or ``"network"``
    (``securefl server``/``client``).  Returns one :class:`CheckResult` per requirement, in the
    model's order."""
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"deployment must be one of {', '.join(DEPLOYMENTS)}, got {deployment!r}")
    model = (threat_model if isinstance(threat_model, ThreatModel)
             else load_threat_model(threat_model))
    known = facts(config, deployment=deployment, aggregator=aggregator)
    results = []
    for requirement in model.requirements:
        control = CONTROLS[requirement.control]
        passed, reason = control.check(known, model, **requirement.params)
        results.append(CheckResult(requirement, passed, reason))
    return results


def require(config: Any, *, deployment: str = "simulation",
            aggregator: Aggregator | None = None) -> list[CheckResult]:
    """Check ``config`` against the threat model it names; raise on any failure.

    Returns the results (empty when ``[run] threat_model`` is unset).  Raises
    :class:`~securefl.errors.ConfigError` whose message lists every failed requirement.
    """
    name = getattr(config.run, "threat_model", None)
    if not name:
        return []
    results = check_config(config, name, deployment=deployment, aggregator=aggregator)
    failed = [r for r in results if not r.passed]
    if failed:
        lines = "\n".join(f"  {r.line()}" for r in failed)
        raise ConfigError(f"the config does not meet threat model {name!r} "
                          f"({len(failed)} of {len(results)} requirements fail):\n{lines}")
    return results
