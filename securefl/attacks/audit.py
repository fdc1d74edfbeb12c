"""``securefl privacy audit CONFIG``: train once with canaries and bound ε from below.

The canaries: white-box gradient canaries for DP-SGD (:mod:`securefl.attacks.audit_gradient`),
canary clients for DP-FedAvg (:mod:`securefl.attacks.audit_user`), or mislabelled input
canaries for any run (here).  The bound and the gate are :mod:`securefl.privacy.audit`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config
from securefl.output import atomic_write
from securefl.privacy.audit import (
    AuditReport,
    gate_fails,
    insert_canaries,
    one_run_lower_bound,
    write_score_plot,
)

__all__ = ["command", "run_audit"]

_log = logging.getLogger(__name__)


def run_audit(config: Config, *, num_canaries: int = 200, confidence: float = 0.95
              ) -> AuditReport:
    """The input-canary audit's report (:func:`_input_audit`)."""
    return _input_audit(config, num_canaries=num_canaries, confidence=confidence)[0]


def _input_audit(config: Config, *, num_canaries: int, confidence: float,
                 on_round: Callable[[Any], None] | None = None
                 ) -> tuple[AuditReport, np.ndarray, np.ndarray]:
    """Insert canaries, train ``config`` with securefl's pipeline, score each canary by the
    final model's logit-scaled confidence in its (wrong) label, and bound ε from one run."""
    from securefl.attacks.inference_suite import train_federation
    from securefl.attacks.membership import logit_confidence, model_outputs
    from securefl.data import federate
    from securefl.models import build_model
    from securefl.vector import unflatten

    rng = np.random.default_rng([config.run.seed, 0xA0D1])
    data, canaries, included = insert_canaries(federate(config.data, seed=config.run.seed),
                                               num_canaries=num_canaries, rng=rng)
    trained = train_federation(config, data, on_round=on_round)
    model = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed)
    unflatten(model, trained.parameters)
    scores = logit_confidence(model_outputs(model, canaries.features), canaries.labels)
    test_logits = model_outputs(model, data.test.features)
    accuracy = float((test_logits.argmax(axis=1) == data.test.labels).mean())
    delta = config.privacy.delta
    bound = one_run_lower_bound(scores, included, delta=delta, confidence=confidence)
    report = AuditReport(bound.epsilon, trained.epsilon, delta, confidence, bound.method,
                         num_canaries, int(included.sum()), bound.num_guesses,
                         bound.num_correct, accuracy)
    return report, scores, included


def command(args: argparse.Namespace) -> int:
    """``securefl privacy audit CONFIG``: print and write ``audit.json`` and
    ``audit-scores.png`` (to ``--out``, default the working directory); with ``--gate``
    exit 1 when :func:`gate_fails`."""
    from securefl.attacks.audit_gradient import run_gradient_audit
    from securefl.attacks.audit_user import run_user_audit
    from securefl.config import load_config
    from securefl.progress import progress

    config = load_config(args.config)
    if args.seed is not None:
        config = config.replace(run__seed=args.seed)
    canary = args.canary or ("client" if config.privacy.mode == "dp_fedavg" else "gradient")
    with progress(f"privacy audit ({canary} canaries): round", config.run.rounds,
                  log=_log) as bar:
        def advance(record: Any) -> None:
            bar.advance(status="" if record.accuracy is None
                        else f"accuracy {record.accuracy:.4f}")

        if canary == "gradient":
            report, scores, included = run_gradient_audit(
                config, num_canaries=args.canaries or 1000, confidence=args.confidence,
                on_round=advance)
        elif canary == "client":
            report, scores, included = run_user_audit(
                config, num_canaries=args.canaries or 5000, confidence=args.confidence,
                on_round=advance)
        else:
            report, scores, included = _input_audit(
                config, num_canaries=args.canaries or 200, confidence=args.confidence,
                on_round=advance)
    failed = gate_fails(report)
    text = json.dumps({**report.to_json(), "gate": "fail" if failed else "pass"}, indent=2)
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "audit.json", text + "\n")
    accountant = ("not private" if not math.isfinite(report.accountant_epsilon)
                  else f"{report.accountant_epsilon:.3f}")
    summary = (f"empirical epsilon lower bound {report.epsilon_lower_bound:.3f} "
               f"(confidence {report.confidence:.0%}) vs accountant epsilon {accountant}")
    if report.epsilon_estimate is not None:
        summary += f"; Gaussian-fit estimate {report.epsilon_estimate:.3f}"
    write_score_plot(scores, included, out / "audit-scores.png", title=summary)
    print(text)
    print(summary)
    if args.gate and failed:
        print("audit gate FAILED: the pipeline leaks more than its accountant says")
        return 1
    return 0
