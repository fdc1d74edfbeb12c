"""``securefl privacy report RUN_DIR``: per-client spend from the run's privacy ledger.

For every client: the rounds it was charged, epsilon at the ledger's delta by Opacus's RDP
accountant and by its PRV accountant (both from the same event history), its budget and what
is left (by the ledger's own accountant, the one that enforced the budget).  Writes
``privacy.json`` and ``epsilon.png`` (epsilon after each round per client, budget dashed)
into the run directory and prints the table.

DP-FedAvg is also reported under both sampling rules (:mod:`securefl.privacy.dp_fedavg`):
``epsilon_public_sampling`` composes one ``q = 1`` Gaussian per round the client released an
update in (what holds once participation is known), ``epsilon_secret_sampling`` one
``q = m / N`` Gaussian per round of the run (what holds only for a secret sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securefl.output import pyplot, save_figure
from securefl.privacy.accounting import PrivacyEvent, epsilon
from securefl.privacy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger

__all__ = ["command", "distinct_curves", "last_round", "plot_epsilon", "summarise",
           "write_report"]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def sampling_views(ledger: PrivacyLedger, client_id: str, *, sampling_rate: float,
                   rounds: int) -> dict[str, float | None]:
    """Epsilon of a DP-FedAvg client under both sampling rules (module docstring)."""
    events = ledger.events(client_id)
    if not events:
        return {"epsilon_public_sampling": 0.0, "epsilon_secret_sampling": 0.0}
    z = events[-1].noise_multiplier
    taken = len(ledger.released_rounds(client_id))
    public = [PrivacyEvent("dp_fedavg", z, 1.0, taken)] if taken else []
    secret = [PrivacyEvent("dp_fedavg", z, sampling_rate, rounds)] if rounds else []
    return {
        "rounds_taken_part": taken,
        "epsilon_public_sampling": _finite(epsilon(public, delta=ledger.delta,
                                                   accountant=ledger.accountant)),
        "epsilon_secret_sampling": _finite(epsilon(secret, delta=ledger.delta,
                                                   accountant=ledger.accountant)),
    }


def last_round(ledger: PrivacyLedger) -> int:
    """The last round any client of ``ledger`` was charged for (0: none)."""
    return max((r for c in ledger.clients() for r in ledger.rounds(c)), default=0)


def summarise(ledger: PrivacyLedger, *, sampling: str | None = None,
              sampling_rate: float | None = None, rounds: int | None = None,
              clients: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``privacy.json`` document of ``ledger`` (``extra`` keys are added at the top).

    Epsilon values that are unbounded, and unlimited budgets, are ``null``.  With
    ``sampling_rate`` (DP-FedAvg's m / N) every client also gets :func:`sampling_views`, the
    run's rounds being ``rounds``, by default :func:`last_round`.  ``clients``: only these
    of the ledger's clients (a party that keeps the ledgers of some sites of a federation).
    """
    entries: dict[str, Any] = {}
    rounds = last_round(ledger) if rounds is None else rounds
    for client_id in ledger.clients() if clients is None else clients:
        events = ledger.events(client_id)
        rdp = ledger.epsilon(client_id, accountant="rdp")
        prv = ledger.epsilon(client_id, accountant="prv")
        spent = rdp if ledger.accountant == "rdp" else prv
        budget = ledger.stored_budget(client_id)
        history = ledger.history(client_id)
        entries[client_id] = {
            "rounds": len(events),
            "steps": sum(e.steps for e in events),
            "epsilon_rdp": _finite(rdp),
            "epsilon_prv": _finite(prv),
            "budget": budget,
            "remaining": None if budget is None else _finite(budget - spent),
            "within_budget": budget is None or all(eps <= budget for _, eps in history),
            "history": [[rnd, _finite(eps)] for rnd, eps in history],
            "mechanism": events[-1].mechanism if events else None,
            "noise_multiplier": events[-1].noise_multiplier if events else None,
            "sample_rate": events[-1].sample_rate if events else None,
        }
        if sampling_rate is not None:
            entries[client_id].update(sampling_views(ledger, client_id, rounds=rounds,
                                                     sampling_rate=sampling_rate))
    if sampling is not None:
        extra["sampling"] = sampling
    return {**extra, "delta": ledger.delta, "accountant": ledger.accountant,
            "ledger": Path(ledger.path).name, "clients": entries}


def plot_epsilon(summary: dict[str, Any], path: Path) -> Path:
    """Epsilon after each round for every client, with each distinct budget dashed."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    figure, axes = plt.subplots(figsize=(7, 4.5))
    clients = summary["clients"]
    curves = distinct_curves(clients)
    for points, ids in curves:
        rounds, values = zip(*points, strict=True)
        name = (ids[0] if len(ids) == 1 else f"{', '.join(ids)} (identical)" if len(ids) <= 3
                else f"{ids[0]} … {ids[-1]} ({len(ids)} identical)")
        axes.step(rounds, values, where="post", marker=".", linewidth=1.2,
                  label=name if len(curves) <= 12 else None)
    shared = len(curves) < sum(1 for e in clients.values() if e["history"])
    if shared:
        figure.text(0.01, 0.01, f"{len(clients)} clients, {len(curves)} distinct curve"
                    f"{'' if len(curves) == 1 else 's'}: clients that spent identically share "
                    "one line", fontsize=8, va="bottom")
    for budget in sorted({e["budget"] for e in clients.values() if e["budget"] is not None}):
        axes.axhline(budget, color="black", linestyle="--", linewidth=1,
                     label=f"budget {budget:g}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(bottom=0)
    axes.set_xlabel("round")
    axes.set_ylabel(f"epsilon at delta={summary['delta']:g} ({summary['accountant']})")
    axes.set_title("privacy spent per client")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, ncol=2)
    figure.tight_layout(rect=(0, 0.04 if shared else 0, 1, 1))
    return save_figure(figure, path)


def distinct_curves(clients: dict[str, Any]) -> list[tuple[tuple[tuple[int, float], ...],
                                                             list[str]]]:
    """The distinct ε-per-round curves among ``clients``, each with the clients that follow
    it (in order of first appearance)."""
    groups: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for client_id, entry in clients.items():
        points = tuple((int(r), float(e)) for r, e in entry["history"] if e is not None)
        if points:
            groups.setdefault(points, []).append(client_id)
    return list(groups.items())


def write_report(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``privacy.json`` and ``epsilon.png`` into ``run_dir``; return ``summary``."""
    from securefl.output import write_json

    write_json(run_dir / "privacy.json", summary)
    plot_epsilon(summary, run_dir / "epsilon.png")
    return summary


def _table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    def number(value: float | None, unbounded: str) -> str:
        return unbounded if value is None else f"{value:.3f}"

    table = Table(title=f"privacy spent at delta={summary['delta']:g} "
                        f"(budget enforced by {summary['accountant'].upper()})")
    views = any("epsilon_public_sampling" in e for e in summary["clients"].values())
    headers = ["client", "rounds", "epsilon (RDP)", "epsilon (PRV)", "budget", "left"]
    if views:
        headers += ["epsilon, sample public", "epsilon, sample secret"]
    for header in headers:
        table.add_column(header, justify="left" if header == "client" else "right")
    for client_id, entry in summary["clients"].items():
        cells = [client_id, str(entry["rounds"]), number(entry["epsilon_rdp"], "inf"),
                 number(entry["epsilon_prv"], "inf"), number(entry["budget"], "none"),
                 number(entry["remaining"], "-")]
        if views:
            cells += [number(entry.get("epsilon_public_sampling"), "inf"),
                      number(entry.get("epsilon_secret_sampling"), "inf")]
        table.add_row(*cells)
    return table


def command(args: Any) -> int:
    """``securefl privacy report RUN_DIR`` of a run with a ledger (a simulation, or a site's
    state folder); :func:`securefl.report.privacy.command` sends a server's state folder to
    its sites' receipts instead."""
    from rich.console import Console

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise LedgerError(f"{run_dir}: no such folder")
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{run_dir}: no {LEDGER_FILE} (was the run made with [privacy] "
                          f"mode = \"dp_sgd\", \"dp_fedavg\" or \"distributed\"?)")
    rate = sampling = None
    if (run_dir / "config.toml").is_file():
        from securefl.config import load_config

        config = load_config(run_dir / "config.toml")
        if config.privacy.mode == "dp_fedavg":
            sampling = config.privacy.sampling
            rate = config.server.per_round(config.data.num_clients) / config.data.num_clients
    with PrivacyLedger.open_existing(path) as ledger:
        summary = summarise(ledger, sampling=sampling, sampling_rate=rate)
    write_report(run_dir, summary)
    console = Console()
    console.print(_table(summary))
    console.print(f"wrote {run_dir / 'privacy.json'} and {run_dir / 'epsilon.png'}")
    return 0
