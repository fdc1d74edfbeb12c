"""The audit gate over seeds: catch rate per planted DP bug, pass rate of the correct pipeline,
and the audit's cost relative to the training run it audits.

For each seed, ``--config``'s federation is calibrated to the claimed ``--epsilon`` (δ from
the config) and audited once as shipped and once per planted bug (noise off, σ / 10, clipping
disabled, 4x the accounted sampling rate; the bugs are the tests' own, never the library's).
The audit follows the config's DP mode:

* DP-SGD (default ``examples/dp_sgd.toml``): sample level, white-box Dirac gradient canaries
  (:func:`securefl.attacks.audit_gradient.run_gradient_audit`; bugs from
  ``tests/privacy/test_audit_gradient.py``);
* DP-FedAvg (e.g. ``examples/dp_fedavg.toml``): user level, canary clients
  (:func:`securefl.attacks.audit_user.run_user_audit`; bugs from
  ``tests/privacy/test_audit_user.py``).  At ε = 1 the example's default clipped-count noise
  (clients per round / 20) is too small for adaptive clipping, so ``--count-stddev`` sets it.

The gate fails when the one-run lower bound exceeds the accountant's ε.  ``cost`` is the
audited run's wall time over the same run without canaries (the first ``--cost-seeds`` seeds,
after one warm-up run).  With ``--non-private CONFIG`` (e.g. ``examples/quickstart.toml``)
the non-private run's gradient-canary lower bound is reported too.

Prints one JSON document (progress per seed on stderr).  ``--seeds 20`` is the full target
(each bug caught in >= 19 of 20 seeds, the correct pipeline passing >= 19).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from securefl.attacks.audit_gradient import run_gradient_audit
from securefl.attacks.audit_user import run_user_audit
from securefl.config import Config, load_config
from securefl.engine.trainer import torch_threads
from securefl.privacy.audit import gate_fails
from securefl.simulation import build_simulation

ROOT = Path(__file__).parents[1]


def _bugs(level: str) -> dict[str, Any]:
    name = "test_audit_user.py" if level == "user" else "test_audit_gradient.py"
    spec = importlib.util.spec_from_file_location("planted_bugs", ROOT / "tests" / "privacy" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.BUGS)


def _train_seconds(config: Config) -> float:
    start = time.perf_counter()
    simulation = build_simulation(config)
    try:
        with torch_threads(config.simulation.torch_threads()):
            simulation.server.run(config.run.rounds)
    finally:
        simulation.transport.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "examples" / "dp_sgd.toml"))
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, help="override [run] rounds (shorter runs)")
    parser.add_argument("--canaries", type=int,
                        help="canaries (default 2000 gradient canaries, 5000 canary clients)")
    parser.add_argument("--count-stddev", type=float, default=10.0,
                        help="DP-FedAvg with adaptive clipping: [privacy] clipped_count_stddev")
    parser.add_argument("--non-private", help="a non-private config to bound as well")
    parser.add_argument("--cost-seeds", type=int, default=3,
                        help="seeds whose audit is timed against a plain training run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base = load_config(args.config).replace(privacy__target_epsilon=args.epsilon)
    level = "user" if base.privacy.mode == "dp_fedavg" else "sample"
    if level == "user" and base.privacy.adaptive_clipping:
        base = base.replace(privacy__clipped_count_stddev=args.count_stddev)
    if args.rounds:
        base = base.replace(run__rounds=args.rounds)
    canaries = args.canaries or (5000 if level == "user" else 2000)
    audit = run_user_audit if level == "user" else run_gradient_audit
    bugs = _bugs(level)
    failed: dict[str, list[bool]] = {name: [] for name in ("correct", *bugs)}
    bounds: dict[str, list[float]] = {name: [] for name in failed}
    estimates: dict[str, list[float | None]] = {name: [] for name in failed}
    costs: list[float] = []
    accountant: list[float] = []
    _train_seconds(base)  # warm-up: imports and first-use costs are not the audit's
    for seed in range(args.seeds):
        config = base.replace(run__seed=seed)
        plain = _train_seconds(config) if seed < args.cost_seeds else None
        for name in failed:
            start = time.perf_counter()
            report, _, _ = audit(config, num_canaries=canaries,  # type: ignore[operator]
                                 tamper=bugs.get(name))
            if name == "correct":
                if plain is not None:
                    costs.append((time.perf_counter() - start) / plain)
                accountant.append(report.accountant_epsilon)
            failed[name].append(gate_fails(report))
            bounds[name].append(round(report.epsilon_lower_bound, 4))
            if report.epsilon_estimate is not None:
                estimates[name].append(round(report.epsilon_estimate, 3))
        print(f"seed {seed}: " + ", ".join(f"{n} {b[-1]}" for n, b in bounds.items()),
              file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "config": str(args.config), "level": level, "claimed_epsilon": args.epsilon,
        "delta": base.privacy.delta, "rounds": base.run.rounds, "seeds": args.seeds,
        "canaries": canaries, "accountant_epsilon_max": max(accountant),
        "passes_correct": sum(not f for f in failed["correct"]),
        "caught": {name: sum(failed[name]) for name in bugs},
        "lower_bounds": bounds,
        "cost_vs_training": [round(c, 3) for c in costs],
        "cost_vs_training_median": statistics.median(costs) if costs else None,
    }
    if level == "user":
        result["clipped_count_stddev"] = base.privacy.clipped_count_stddev
        result["epsilon_estimates"] = estimates
    if args.non_private:
        config = load_config(args.non_private)
        if args.rounds:
            config = config.replace(run__rounds=args.rounds)
        report, _, _ = run_gradient_audit(config, num_canaries=canaries)
        result["non_private"] = {"config": args.non_private,
                                 "lower_bound": report.epsilon_lower_bound,
                                 "correct": report.num_correct, "guesses": report.num_guesses}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
