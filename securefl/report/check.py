"""``securefl check CONFIG``: a configuration against a threat model, and whether its rounds
can finish at all (the checks ``securefl run`` and ``securefl server`` make before training)."""

from __future__ import annotations

import argparse
from typing import Any

from securefl.build import aggregator_for, check_feasible, load_config
from securefl.errors import ConfigError
from securefl.runtime.deploy import check_rounds
from securefl.threat import check_config
from securefl.threat.model import available_threat_models, load_threat_model

__all__ = ["command", "round_problem"]


def command(args: argparse.Namespace) -> int:
    """``securefl check CONFIG [--threat-model NAME]``: one line per requirement; exit 1 on any
    failure."""
    config = load_config(args.config)
    name = args.threat_model or config.run.threat_model
    if not name:
        raise ConfigError(f"{args.config}: no threat model: pass --threat-model NAME or set "
                          f"[run] threat_model (shipped: {', '.join(available_threat_models())})")
    model = load_threat_model(name)
    results = check_config(config, model, deployment=getattr(args, "deployment", "simulation"))
    problem = round_problem(config, deployment=getattr(args, "deployment", "simulation"))
    print(f"threat model {model.name}: {model.title}")
    for result in results:
        print(result.line())
    if problem is not None:
        print(f"FAIL  rounds-can-finish: {problem}")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} of {len(results)} requirements pass"
          + (f"; {args.config} does not meet {model.name}" if failed else "")
          + ("; its rounds cannot finish, so securefl refuses to start it" if problem else ""))
    return 1 if failed or problem is not None else 0


def round_problem(config: Any, *, deployment: str = "simulation") -> str | None:
    """Why the rounds ``config`` starts cannot finish, or ``None``: the checks ``securefl
    run`` and ``securefl server`` make before any training (the rule's byzantine bound,
    ``min_clients``, a secure-aggregation round and, deployed, ``[network] min_connected``)."""
    try:
        sites = len(config.network.allowlist) if deployment == "network" else 0
        check_feasible(config, aggregator_for(config),
                       num_clients=sites or config.data.num_clients)
        if deployment == "network":
            check_rounds(config)
    except ConfigError as exc:
        return str(exc)
    return None
