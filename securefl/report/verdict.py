"""The verdict at the top of the compliance report: which controls held, what was spent.

Each row is one function of the :class:`RunFacts` (read once per report), returning a
:class:`VerdictRow` or ``None`` when it does not apply; :data:`ROWS` lists them in order, so
another row (an empirical-ε audit, say) is one more function in that tuple.  The verdict
holds when no row fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefl.report.render import Paragraph, Section, Table
from securefl.report.spent import Spent

__all__ = ["ROWS", "RunFacts", "VerdictRow", "verdict_section"]


@dataclass
class RunFacts:
    """What the report reads from a run directory, once."""

    directory: Path
    config: Any
    deployment: str  #: "network" when the folder holds an audit log, else "simulation"
    spent: Spent
    checks: list[Any] | None = None  #: threat-model results, None without a model
    threat_model: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    audit: Any = None  #: :class:`securefl.runtime.auditlog.VerifyResult` of a network run


@dataclass(frozen=True)
class VerdictRow:
    check: str
    passed: bool | None  #: None: stated, neither held nor failed
    result: str


def _controls(facts: RunFacts) -> VerdictRow:
    if facts.checks is None:
        return VerdictRow("Threat-model controls", None,
                          "no threat model named ([run] threat_model), none checked")
    failed = [r.id for r in facts.checks if not r.passed]
    total = len(facts.checks)
    if failed:
        return VerdictRow("Threat-model controls", False,
                          f"{facts.threat_model}: {total - len(failed)} of {total} hold; "
                          f"failing: {', '.join(failed)} (checked as a {facts.deployment} run)")
    return VerdictRow("Threat-model controls", True,
                      f"{facts.threat_model}: all {total} hold (checked as a "
                      f"{facts.deployment} run)")


def _rounds(facts: RunFacts) -> VerdictRow | None:
    planned = facts.config.run.rounds if facts.config is not None else None
    if not facts.metrics:
        return VerdictRow("Rounds", False, "no round is recorded (no metrics.jsonl)")
    done = sum(1 for r in facts.metrics if r.get("clients") and not r.get("aborted"))
    of = f" of {planned} planned" if planned is not None else ""
    return VerdictRow("Rounds", done > 0, f"{done} aggregated{of}, "
                      f"{len(facts.metrics) - done} aborted or empty")


def _privacy(facts: RunFacts) -> VerdictRow:
    spent = facts.spent
    mode = facts.config.privacy.mode if facts.config is not None else "unknown"
    if spent.problems:
        return VerdictRow("Privacy spent", False, "; ".join(spent.problems))
    if not spent.clients:
        return VerdictRow("Privacy spent", None if mode == "none" else False,
                          "no differential privacy ([privacy] mode = \"none\")" if mode == "none"
                          else f"[privacy] mode = {mode!r} but no ε was recorded")
    largest = spent.largest
    # a receipt carries no budget: each site enforces the config's own
    configured = facts.config.privacy.epsilon_budget if facts.config is not None else None
    limits = {c.client: c.budget if c.budget is not None else configured for c in spent.clients}
    budgets = {b for b in limits.values() if b is not None}
    over = [c.client for c in spent.clients if (limit := limits[c.client]) is not None
            and (c.epsilon is None or c.epsilon > limit + 1e-9)]
    text = (f"largest ε {'unbounded' if largest is None else f'{largest:.4g}'} at "
            f"δ = {spent.clients[0].delta:g} over {len(spent.clients)} "
            f"{'sites' if spent.source == 'receipts' else 'clients'}"
            + (f", budget {', '.join(f'{b:g}' for b in sorted(budgets))}" if budgets else "")
            + f"; from {spent.describe()}")
    if over:
        return VerdictRow("Privacy spent", False, f"{text}; over budget: {', '.join(over)}")
    return VerdictRow("Privacy spent", True, text)


def _audit_log(facts: RunFacts) -> VerdictRow:
    if facts.deployment != "network" or facts.audit is None:
        return VerdictRow("Signed audit log", None,
                          "none: an in-process simulation writes no audit log")
    if facts.audit.ok:
        return VerdictRow("Signed audit log", True,
                          f"verified: {facts.audit.entries} entries, every hash link and "
                          "signature checks out")
    return VerdictRow("Signed audit log", False, "FAILED: " + "; ".join(facts.audit.problems))


#: the verdict's rows, in order; each returns None when it does not apply
ROWS: tuple[Callable[[RunFacts], VerdictRow | None], ...] = (
    _controls, _rounds, _privacy, _audit_log)


def verdict_section(facts: RunFacts) -> Section:
    rows = [row for build in ROWS if (row := build(facts)) is not None]
    failed = [r.check for r in rows if r.passed is False]
    headline = (Paragraph("Verdict: every recorded control held. " + _spend_line(facts),
                          status=True) if not failed else
                Paragraph(f"Verdict: needs attention ({', '.join(failed)}). "
                          + _spend_line(facts), status=False))
    status = {True: "PASS", False: "FAIL", None: "—"}
    return Section("verdict", "Verdict", [
        headline, Table(["check", "result", "details"],
                        [[r.check, status[r.passed], r.result] for r in rows], status_column=1)])


def _spend_line(facts: RunFacts) -> str:
    largest = facts.spent.largest
    if not facts.spent.clients:
        return "No ε was spent: the run used no differential privacy."
    return (f"Spent: at most ε = {'unbounded' if largest is None else f'{largest:.4g}'} "
            f"per {'site' if facts.spent.source == 'receipts' else 'client'}.")
