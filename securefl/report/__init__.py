"""The compliance report of a run: one self-contained HTML file and the same in Markdown.

``securefl report RUN_DIR`` reads what the run left in its directory and writes
``report.html`` (images inlined as base64 data URIs, no scripts, no external resources) and
``report.md`` next to it.  Sections, in order, each saying so explicitly when its data is
missing:

0. the verdict (:mod:`securefl.report.verdict`): which controls held, what was spent;
1. the run (``summary.json``);
2. the threat model and each of its checks (:func:`securefl.threat.check_config` on the
   resolved ``config.toml``; a run with an audit log is checked as a network deployment);
3. the protection, the aggregator and the privacy settings (``config.toml``);
4. the participants of every round (``metrics.jsonl``) and the accuracy plot;
5. ε spent per client from the run's one source of ε (:mod:`securefl.report.spent`: the
   sites' signed receipts in a deployment, the clients' ledgers in a simulation), with
   ``epsilon.png``;
6. the attack-suite results (``results.jsonl``, ``RESULTS.md``, their PNG figures);
7. the verification of the signed audit log (:func:`securefl.runtime.auditlog.verify`) and
   of the sites' signed privacy receipts recorded in it (:mod:`securefl.report.receipts`);
8. the empirical privacy audit's ε beside the accountant's (``audit.json``,
   :mod:`securefl.report.empirical`).

Tables show human labels (:mod:`securefl.report.labels`), and only the privacy settings of
the mode the run used.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefl.errors import SecureFLError
from securefl.report.empirical import AUDIT_PLOT, empirical_audit_section
from securefl.report.labels import PRIVACY_SETTINGS, label
from securefl.report.receipts import receipt_blocks
from securefl.report.render import (
    Paragraph,
    Pre,
    Section,
    Table,
    fmt,
    image,
    read_json,
    read_jsonl,
    render_html,
    render_markdown,
)
from securefl.report.spent import spent
from securefl.report.verdict import RunFacts, verdict_section

__all__ = ["build_sections", "command", "write_report"]

_KNOWN_IMAGES = {"epsilon.png", "accuracy.png", AUDIT_PLOT}
_SHOWN_PRIVACY_KEYS = {"remaining", "epsilon_rdp", "epsilon_prv"}
#: a folder holding none of these is no run's directory: no report is written into it
_RUN_FILES = ("config.toml", "summary.json", "metrics.jsonl", "audit.log", "privacy.json")
#: summary.json keys the Run table leaves to their own section (ε: the Privacy section)
_NOT_IN_SUMMARY = {"epsilon_spent"}


@dataclass
class _Run:
    directory: Path
    config: Any = None
    config_error: str | None = None
    facts: RunFacts | None = None


def _run_section(run: _Run) -> Section:
    summary = read_json(run.directory / "summary.json")
    rows = [["Run directory", str(run.directory)],
            ["Report generated", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")]]
    blocks: list[Any] = []
    if isinstance(summary, dict):
        rows += [[label(str(k)), fmt(v)] for k, v in summary.items()
                 if k not in _NOT_IN_SUMMARY]
    else:
        blocks.append(Paragraph("No summary.json in this run directory: the run may not have "
                                "finished."))
    return Section("summary", "Run", [Table(["item", "value"], rows), *blocks])


def _facts(run: _Run) -> RunFacts:
    """Read once what the verdict and the sections share."""
    from securefl.threat import check_config, load_threat_model

    directory = run.directory
    deployment = "network" if (directory / "audit.log").exists() else "simulation"
    facts = RunFacts(directory, run.config, deployment, spent(directory, run.config))
    name = run.config.run.threat_model if run.config is not None else None
    if name:
        try:
            facts.checks = check_config(run.config, load_threat_model(name),
                                        deployment=deployment)
            facts.threat_model = name
        except SecureFLError:
            facts.checks = None
    read = read_jsonl(directory / "metrics.jsonl")
    facts.metrics = read[0] if read is not None else []
    if deployment == "network":
        from securefl.runtime.auditlog import verify

        facts.audit = verify(directory)
    return facts


def _threat_section(run: _Run) -> Section:
    from securefl.threat import check_config, load_threat_model

    title = "Threat model and checks"
    if run.config is None:
        return Section("threat-model", title, [Paragraph(
            f"No readable config.toml ({run.config_error}): the threat model cannot be checked.")])
    name = run.config.run.threat_model
    if not name:
        return Section("threat-model", title, [Paragraph(
            "The configuration names no threat model ([run] threat_model is unset), so no "
            "requirement was checked. Run `securefl check config.toml --threat-model NAME`.")])
    try:
        model = load_threat_model(name)
    except SecureFLError as exc:
        return Section("threat-model", title, [Paragraph(f"Threat model {name!r}: {exc}")])
    deployment = "network" if (run.directory / "audit.log").exists() else "simulation"
    results = check_config(run.config, model, deployment=deployment)
    failed = sum(not r.passed for r in results)
    verdict = (f"All {len(results)} requirements pass." if not failed else
               f"{failed} of {len(results)} requirements FAIL.")
    adversaries = [[a.who, a.behaviour, "; ".join(a.capabilities)] for a in model.adversaries]
    return Section("threat-model", title, [
        Paragraph(f"{model.name}: {model.title}. Checked as a {deployment} run. {verdict}"),
        Paragraph(model.summary),
        Table(["trusted"], [[t] for t in model.trusted] or [["nobody"]]),
        Table(["must stay secret"], [[s] for s in model.secrets] or [["nothing"]]),
        Table(["adversary", "behaviour", "capabilities"], adversaries),
        *([Table(["knowingly given up"], [[g] for g in model.gives_up])] if model.gives_up
          else []),
        Table(["requirement", "result", "why"],
              [[r.id, "PASS" if r.passed else "FAIL", r.reason] for r in results],
              status_column=1),
    ])


def _protection_section(run: _Run) -> Section:
    title = "Protection and aggregation"
    if run.config is None:
        return Section("protection", title, [Paragraph(
            f"No readable config.toml ({run.config_error}): protection and aggregator unknown.")])
    config = run.config
    kind = config.protection.kind
    rows = [["Protection", {"plain": "none (plaintext updates)", "secagg": "secure aggregation "
                            "(SecAgg+)", "he": "homomorphic encryption (CKKS)"}.get(kind, kind)]]
    if kind in ("secagg", "he"):
        section = getattr(config.protection, kind)
        rows += [[label(f"{kind}.{k}"), fmt(v)] for k, v in vars(section).items()]
    rows.append(["Aggregation rule", config.aggregation.rule])
    rows += [[label(k), fmt(v)] for k, v in config.aggregation.options.items()]
    privacy = config.privacy
    adaptive = ("target_quantile", "clip_learning_rate", "clipped_count_stddev")
    facts = run.facts if run.facts is not None else _facts(run)
    rows += [[label(k), _privacy_value(privacy, k, deployment=facts.deployment)]
             for k in PRIVACY_SETTINGS.get(privacy.mode, ("mode",))
             if not (k in adaptive and not privacy.adaptive_clipping)]
    network = config.network
    if facts.deployment == "network":
        rows += [[label(f"network.{k}"), fmt(v)] for k, v in (
            ("insecure", getattr(network, "insecure", None)),
            ("certs", getattr(network, "certs", None)),
            ("allowlist", sorted(getattr(network, "allowlist", {}) or {})),
            ("audit", getattr(network, "audit", None)))]
    else:
        rows.append(["Deployment", "in-process simulation (no network, no audit log)"])
    rows += [["Clients", str(config.data.num_clients)], ["Rounds planned", str(config.run.rounds)],
             ["Seed", str(config.run.seed)]]
    return Section("protection", title, [Table(["setting", "value"], rows)])


def _privacy_value(privacy: Any, key: str, *, deployment: str) -> str:
    """A [privacy] setting as the run used it (defaults said in words)."""
    value = getattr(privacy, key)
    if key == "budget":
        value = getattr(privacy, "epsilon_budget", value)
        return "none (no limit)" if value is None else fmt(value)
    if key == "noise_multiplier" and value is None:
        return "calibrated from the target ε"
    if key == "participation_quantile" and value is None:
        if privacy.mode == "distributed":
            return "0.999 (the default for distributed DP)"
        return ("not used (secret sample)" if privacy.sampling == "secret"
                else "none: the expected number of rounds (the default)")
    if key == "secure_mode" and value is None:
        if deployment == "network":
            return "yes (the default at a deployed site)"
        if privacy.mode == "dp_fedavg" and privacy.sampling == "secret":
            return "yes (the default for a secret sample)"
        return "no: seeded, reproducible (the default in a simulation)"
    return fmt(value)


def _participants_section(run: _Run) -> Section:
    title = "Participants per round"
    read = read_jsonl(run.directory / "metrics.jsonl")
    if read is None:
        return Section("participants", title, [Paragraph(
            "No metrics.jsonl in this run directory: the participants of each round are "
            "unknown.")])
    rows, warnings = read
    table = []
    for row in rows:
        table.append([fmt(row.get("round")), str(len(row.get("sampled") or [])),
                      str(len(row.get("clients") or [])), fmt(row.get("clients")),
                      fmt(row.get("dropped") or None),
                      fmt(row.get("declined") or None), fmt(row.get("rejected") or None),
                      fmt(row.get("aborted")), fmt(row.get("accuracy")),
                      fmt(row.get("loss")), fmt(row.get("seconds"))])
    blocks: list[Any] = [Table(["round", "sampled", "aggregated", "aggregated clients",
                                "dropped", "declined", "rejected", "aborted", "accuracy", "loss",
                                "seconds"], table)]
    if not rows:
        blocks = [Paragraph("metrics.jsonl is empty: no round completed.")]
    blocks.extend(warnings)
    plot = run.directory / "accuracy.png"
    if plot.is_file():
        blocks.append(image(plot, "Test accuracy per round"))
    return Section("participants", title, blocks)


def _client_rows(privacy: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``privacy.json`` (:func:`securefl.privacy.report.summarise`): ``clients`` maps each id to
    its ``epsilon_rdp``, ``epsilon_prv``, ``budget``, ``remaining``, ``rounds``, ..."""
    clients = privacy.get("clients")
    if isinstance(clients, Mapping):
        return {str(k): v for k, v in clients.items() if isinstance(v, Mapping)}
    return {}


def _privacy_section(run: _Run) -> Section:
    title = "Privacy: ε spent per client"
    facts = run.facts if run.facts is not None else _facts(run)
    used = facts.spent
    mode = run.config.privacy.mode if run.config is not None else "unknown"
    blocks: list[Any] = [Paragraph(f"Source of every ε in this report: {used.describe()}.")]
    blocks += [Paragraph(f"FAILED: {p}", status=False) for p in used.problems]
    if used.source == "none":
        blocks.append(Paragraph(
            "No ε was accounted: the run used no differential privacy." if mode == "none"
            else f"[privacy] mode = {mode!r}, but this folder holds no privacy ledger, "
            "privacy.json or signed receipts, so no ε can be reported."))
    elif used.source == "receipts":
        budget = run.config.privacy.epsilon_budget if run.config is not None else None
        blocks.append(Table(
            ["site", "ε spent", "δ", "ε budget (each site enforces it)", "ε left", "receipts",
             "mechanism"],
            [[c.client, fmt(c.epsilon), f"{c.delta:g}", fmt(budget),
              fmt(None if budget is None or c.epsilon is None else budget - c.epsilon),
              str(c.rounds), c.mechanism or "—"] for c in used.clients]))
    else:
        blocks.extend(_ledger_blocks(used.summary or {}))
    plot = run.directory / "epsilon.png"
    if plot.is_file():
        blocks.append(image(plot, "ε per round for each client, with the budget"))
    elif used.source == "ledger":
        blocks.append(Paragraph("No epsilon.png in this run directory."))
    return Section("privacy", title, blocks)


def _ledger_blocks(data: Mapping[str, Any]) -> list[Any]:
    blocks: list[Any] = []
    header = [[label(k), fmt(v)] for k, v in sorted(data.items())
              if not isinstance(v, Mapping | list)]
    if header:
        blocks.append(Table(["setting", "value"], header))
    clients = _client_rows(data)
    if not clients:
        return [*blocks, Paragraph("The ledger lists no clients.")]
    columns = sorted({k for c in clients.values() for k, v in c.items()
                      if not isinstance(v, Mapping | list)} - _SHOWN_PRIVACY_KEYS)
    accountant = str(data.get("accountant", "rdp"))
    other = "prv" if accountant == "rdp" else "rdp"
    rows = [[cid, fmt(entry.get(f"epsilon_{accountant}")), fmt(entry.get("remaining")),
             fmt(entry.get(f"epsilon_{other}"))] + [fmt(entry.get(c)) for c in columns]
            for cid, entry in sorted(clients.items())]
    blocks.append(Table(["client", f"ε spent ({accountant.upper()}, enforced)", "ε left",
                         f"ε by {other.upper()} (cross-check)", *map(label, columns)], rows))
    return blocks


def _attacks_section(run: _Run) -> Section:
    title = "Attack-suite results"
    blocks: list[Any] = []
    rows, warnings = read_jsonl(run.directory / "results.jsonl") or ([], [])
    blocks.extend(warnings)
    if rows:
        columns = sorted({k for r in rows for k, v in r.items()
                          if not isinstance(v, Mapping | list)})
        blocks.append(Table(columns, [[fmt(r.get(c)) for c in columns] for r in rows]))
    markdown = run.directory / "RESULTS.md"
    if markdown.is_file():
        blocks.append(Pre(markdown.read_text(encoding="utf-8")))
    for png in sorted(run.directory.glob("*.png")):
        if png.name not in _KNOWN_IMAGES:
            blocks.append(image(png, png.stem))
    if not blocks:
        blocks.append(Paragraph("This run has no attack-suite results (no results.jsonl or "
                                "RESULTS.md)."))
    return Section("attacks", title, blocks)


def _audit_section(run: _Run) -> Section:
    title = "Audit log verification"
    if not any((run.directory / n).exists() for n in ("audit.log", "audit.head")):
        return Section("audit-log", title, [Paragraph(
            "no audit log: this run directory has no audit.log (in-process simulations do not "
            "write one; a networked server does).")])
    from securefl.runtime.auditlog import verify

    result = verify(run.directory)
    key = run.directory / "audit.pub"
    signer = key.read_text(encoding="utf-8").strip() if key.is_file() else "missing"
    if result.ok:
        verdict = (f"VERIFIED: {result.entries} entries; every hash link, signature and the "
                   f"signed head check out. Head hash {result.head}.")
    else:
        verdict = "FAILED: " + "; ".join(result.problems)
    events = [[fmt(e.get("index")), fmt(e.get("time")), fmt(e.get("event"))]
              for e in result.events]
    return Section("audit-log", title, [
        Paragraph(verdict, status=result.ok),
        Paragraph(f"Signer (Ed25519 public key from audit.pub): {signer}. Compare it with the "
                  "key the server operator published; a forger could replace both."),
        *([Table(["index", "time", "event"], events)] if events else []),
        *receipt_blocks(run.directory),
    ])


def build_sections(run_dir: str | Path) -> list[Section]:
    """Every section of the report of ``run_dir``, in order."""
    from securefl.config import load_config

    run = _Run(Path(run_dir))
    try:
        run.config = load_config(run.directory / "config.toml")
    except SecureFLError as exc:
        run.config_error = str(exc)
    run.facts = _facts(run)
    return [verdict_section(run.facts), _run_section(run), _threat_section(run),
            _protection_section(run), _participants_section(run), _privacy_section(run),
            _attacks_section(run), _audit_section(run), empirical_audit_section(run.directory)]


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``run_dir``; return their paths."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise SecureFLError(f"{directory}: not a run directory")
    if not any((directory / name).exists() for name in _RUN_FILES):
        raise SecureFLError(f"{directory}: not a run directory (it holds none of "
                            f"{', '.join(_RUN_FILES)}); no report written")
    sections = build_sections(directory)
    title = f"securefl compliance report: {directory.resolve().name}"
    html_path, md_path = directory / "report.html", directory / "report.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections), encoding="utf-8")
    return html_path, md_path


def command(args: argparse.Namespace) -> int:
    """``securefl report RUN_DIR``: write the report and print where it is."""
    html_path, md_path = write_report(args.run_dir)
    print(f"wrote {html_path}")
    print(f"wrote {md_path}")
    return 0
