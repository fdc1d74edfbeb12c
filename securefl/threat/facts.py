"""The security-relevant facts of a run configuration, in the terms the threat-model
controls (:mod:`securefl.threat.controls`) need.

Facts are read with ``getattr`` and a default, so a config section that lacks a field (an
older or partial config) reads as the weaker setting: a control is never passed on a field
that is not there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from securefl.aggregation import Aggregator, build_aggregator
from securefl.config import clients_per_round

__all__ = ["Facts", "facts", "known_rule"]


@dataclass(frozen=True)
class Facts:
    """What a config does, in the terms the controls need."""

    protection: str
    rule: str
    options: Mapping[str, Any]
    linear: bool
    num_clients: int
    clients_per_round: int
    privacy_mode: str
    #: ``[privacy] secure_mode``: None = CSPRNG when deployed, seeded in simulation
    dp_secure_mode: bool | None
    epsilon_budget: float | None
    delta: float | None
    insecure: bool
    certs: str | None
    allowlist: Mapping[str, str]
    audit: bool
    he_key_on_server: bool
    he_layers: tuple[str, ...]
    secagg_neighbours: int | str
    secagg_threshold: float
    deployment: str
    secagg_min_neighbours: int = 2
    #: the run's aggregator, built once (None: a rule the registry does not know)
    aggregator: Aggregator | None = None
    #: distributed DP: sites whose noise shares the calibration lets the adversary know
    dp_colluding_sites: int = 0


def known_rule(rule: str, options: Mapping[str, Any]) -> Aggregator | None:
    """The configured rule, or None for one the registry does not (yet) know."""
    try:
        return build_aggregator(rule, **options)
    except (ValueError, TypeError):
        return None


def facts(config: Any, *, deployment: str = "simulation",
          aggregator: Aggregator | None = None) -> Facts:
    """Read the security-relevant facts of ``config``.

    Clients per round follow the server's sampler: ``[server] clients_per_round`` if set,
    else ``ceil(fraction * num_clients)``, at most ``num_clients``.  The HE
    secret key counts as held by the server when ``[protection.he] server_holds_secret_key``
    is true or ``key_holder = "server"``; securefl's own HE never does this (the server gets a
    public context only), so both read as false when absent.
    """
    server, data, privacy = config.server, config.data, config.privacy
    network, protection = config.network, config.protection
    num_clients = int(getattr(data, "num_clients", 1))
    per_round = clients_per_round(num_clients, count=getattr(server, "clients_per_round", None),
                                  fraction=float(getattr(server, "fraction", 1.0)))
    he, secagg = getattr(protection, "he", None), getattr(protection, "secagg", None)
    options = MappingProxyType(dict(getattr(config.aggregation, "options", {})))
    if aggregator is None:
        aggregator = known_rule(config.aggregation.rule, options)
    budget = getattr(privacy, "epsilon_budget", None)
    if budget is None:
        budget = getattr(privacy, "budget", None) or getattr(privacy, "target_epsilon", None)
    return Facts(
        protection=protection.kind, rule=config.aggregation.rule, options=options,
        linear=(aggregator.linear if aggregator is not None
                else config.aggregation.rule == "fedavg"),
        aggregator=aggregator,
        num_clients=num_clients, clients_per_round=per_round,
        privacy_mode=getattr(privacy, "mode", "none"),
        dp_secure_mode=getattr(privacy, "secure_mode", False),
        epsilon_budget=None if budget is None else float(budget),
        delta=getattr(privacy, "delta", None),
        insecure=bool(getattr(network, "insecure", True)),
        certs=getattr(network, "certs", None) or None,
        allowlist=MappingProxyType(dict(getattr(network, "allowlist", {}) or {})),
        audit=bool(getattr(network, "audit", False)),
        he_key_on_server=bool(getattr(he, "server_holds_secret_key", False)
                              or getattr(he, "key_holder", None) == "server"),
        he_layers=tuple(getattr(he, "layers", ()) or ()),
        secagg_neighbours=getattr(secagg, "neighbours", "auto"),
        secagg_threshold=float(getattr(secagg, "threshold", 0.5)),
        secagg_min_neighbours=int(getattr(secagg, "min_neighbours", 2)),
        dp_colluding_sites=int(getattr(privacy, "colluding_sites", 0)),
        deployment=deployment)
