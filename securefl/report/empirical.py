"""Report section: the empirical privacy audit (``audit.json`` of ``securefl privacy audit
CONFIG --out RUN_DIR``) next to the accountant's ε.

The audit trains the run's configuration once more with canaries (:mod:`securefl.privacy.audit`);
its lower bound holds at the stated confidence if that run was (ε, δ)-DP, so a bound above
the accountant's ε is evidence of a bug, and a bound below it proves nothing about tightness.
The Gaussian-fit estimate of the user-level audit (Andrew et al., ICLR 2024) is an estimate,
not a bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from securefl.report.render import Image, Paragraph, Section, Table

__all__ = ["AUDIT_PLOT", "empirical_audit_section"]

AUDIT_PLOT = "audit-scores.png"

_CANARIES = {"gradient": "sample level, white-box gradient canaries",
             "client": "user level, canary clients", "input": "mislabelled input canaries"}


def _number(value: Any) -> str:
    if value is None:
        return "∞ (not private)"
    return f"{value:.3f}" if isinstance(value, int | float) else str(value)


def empirical_audit_section(directory: Path) -> Section:
    """The audit's ε lower bound (and estimate) beside the accountant's ε, the gate's verdict
    and the canary score plot; says so when the run directory holds no ``audit.json``."""
    title = "Empirical privacy audit"
    try:
        audit = json.loads((directory / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        audit = None
    if not isinstance(audit, dict):
        return Section("empirical-audit", title, [Paragraph(
            "No audit.json in this run directory (run `securefl privacy audit CONFIG --gate "
            "--out RUN_DIR` to add one).")])
    bound, accountant = audit.get("epsilon_lower_bound"), audit.get("accountant_epsilon")
    confidence = audit.get("confidence")
    level = f"{confidence:.0%}" if isinstance(confidence, int | float) else "?"
    rows = [["audit", _CANARIES.get(str(audit.get("canary")), str(audit.get("canary")))],
            ["canaries (inserted)", f"{audit.get('num_canaries')} ({audit.get('num_included')})"],
            [f"empirical ε lower bound ({level} confidence)", _number(bound)],
            ["accountant's ε (the audited run)", _number(accountant)],
            ["δ", _number(audit.get("delta"))]]
    if "epsilon_estimate" in audit and audit.get("canary") == "client":
        estimate = audit["epsilon_estimate"]
        rows.append(["Gaussian-fit ε estimate (not a bound)",
                     "∞" if estimate is None else _number(estimate)])
    blocks: list[Any] = [Table(["", "value"], rows)]
    if isinstance(bound, int | float):
        limit = math.inf if accountant is None else float(accountant)
        passed = bound <= limit
        blocks.append(Paragraph(
            ("PASS: the lower bound does not exceed the accountant's ε." if passed else
             "FAIL: the lower bound exceeds the accountant's ε; the pipeline leaks more than "
             "it accounts (a bug, with probability at least the confidence)."), status=passed))
    plot = directory / AUDIT_PLOT
    if plot.is_file():
        blocks.append(Image(caption="canary scores, inserted against not inserted",
                            name=plot.name, png=plot.read_bytes()))
    return Section("empirical-audit", title, blocks)
