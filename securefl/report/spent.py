"""The one source of ε in a report: what each client or site spent, and where that comes from.

* A networked run (its folder holds ``audit.log``): the privacy receipts the sites signed,
  read back from the audit log and verified under their pinned identity keys
  (:func:`securefl.runtime.receipts.receipts_of_run`).  The server keeps no ledger; its
  ``summary.json`` copy is not used.
* A simulation: the clients' privacy ledger (``privacy_ledger.sqlite``), summarised as
  ``securefl privacy report`` does (:func:`securefl.privacy.report.summarise`); a folder
  that only kept ``privacy.json`` is read from that.

Every section of the report, and its verdict, reads ε from :func:`spent` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ClientSpend", "Spent", "spent"]


@dataclass(frozen=True)
class ClientSpend:
    client: str
    epsilon: float | None  #: None: unbounded
    delta: float
    budget: float | None = None
    rounds: int = 0
    mechanism: str | None = None


@dataclass
class Spent:
    """ε per client, its source, and every problem met reading it."""

    source: str  #: "receipts", "ledger" or "none"
    clients: list[ClientSpend] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    accountant: str | None = None
    summary: dict[str, Any] | None = None  #: the ledger summary (simulation)

    @property
    def largest(self) -> float | None:
        values = [c.epsilon for c in self.clients]
        if not values:
            return None
        return None if any(v is None for v in values) else max(v for v in values
                                                                if v is not None)

    def describe(self) -> str:
        return {"receipts": "the privacy receipts signed by the sites (verified)",
                "ledger": "the clients' privacy ledgers",
                "none": "no privacy accounting"}[self.source]


def spent(directory: Path, config: Any) -> Spent:
    """What :mod:`this module <securefl.report.spent>` says: ε per client of the run in
    ``directory`` (``config``: its parsed ``config.toml``, or ``None``)."""
    if (directory / "audit.log").is_file():
        return _from_receipts(directory)
    return _from_ledger(directory, config)


def _from_receipts(directory: Path) -> Spent:
    from securefl.runtime.auditlog import receipts_of_run

    receipts, problems = receipts_of_run(directory)
    result = Spent("receipts" if receipts or problems else "none", problems=list(problems))
    for site, bodies in sorted(receipts.items()):
        last = bodies[-1]
        result.clients.append(ClientSpend(
            site, float(last["epsilon_total"]), float(last["delta"]), rounds=len(bodies),
            mechanism=", ".join(sorted({e["mechanism"] for b in bodies for e in b["events"]}))))
    return result


def _from_ledger(directory: Path, config: Any) -> Spent:
    from securefl.privacy import LEDGER_FILE

    summary = _ledger_summary(directory / LEDGER_FILE, config)
    try:
        recorded = json.loads((directory / "privacy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if summary is None:
        if recorded is None:
            return Spent("none")
        summary = recorded
    elif isinstance(recorded, dict):
        # the ledger is the source of every ε; the run's privacy.json adds the settings of
        # its mechanism (e.g. distributed DP's cohort and noise), which the ledger lacks
        summary = {**{k: v for k, v in recorded.items() if k != "clients"}, **summary}
    if not isinstance(summary, dict) or not isinstance(summary.get("clients"), dict):
        return Spent("none", problems=["privacy.json is not a privacy summary"])
    accountant = str(summary.get("accountant", "rdp"))
    result = Spent("ledger", accountant=accountant, summary=summary)
    for client, entry in sorted(summary["clients"].items()):
        if isinstance(entry, dict):
            result.clients.append(ClientSpend(
                str(client), entry.get(f"epsilon_{accountant}"),
                float(summary.get("delta", 0.0)), budget=entry.get("budget"),
                rounds=int(entry.get("rounds", 0)), mechanism=entry.get("mechanism")))
    return result


def _ledger_summary(path: Path, config: Any) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from securefl.privacy.ledger import LedgerError, PrivacyLedger
    from securefl.privacy.report import summarise

    rate = None
    if config is not None and config.privacy.mode == "dp_fedavg":
        clients = config.data.num_clients
        rate = config.server.per_round(clients) / clients
    try:
        with PrivacyLedger.open_existing(path) as ledger:
            return summarise(ledger, sampling_rate=rate,
                             sampling=config.privacy.sampling if rate is not None else None)
    except LedgerError:
        return None
