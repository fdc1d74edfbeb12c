"""``securefl server CONFIG [--resume]``: the federation server over gRPC, durable and audited.

Each round ``t`` (the engine's :class:`~securefl.engine.server.Server` does the work; this
module adds what a long-lived process needs):

1. audit ``round_start`` (participants sampled from ``(seed, t)``, protection, aggregator,
   hash of the model the round starts from) and record the round as started in SQLite;
2. ``Server.run_round(t)`` over :class:`~securefl.runtime.transport.GrpcTransport`;
3. collect the sites' signed privacy receipts (:mod:`securefl.runtime.receipts`), then
   checkpoint model + optimizer state atomically and mark the round completed, with each
   site's ε *from its receipt* (the server's copy of the ledger) — see
   :mod:`securefl.runtime.store`;
4. have the sites countersign the round's statement (:mod:`securefl.runtime.evidence`) and
   audit ``round_end`` (who contributed, who dropped/declined/was rejected, ε charged, new
   model hash, accuracy, the statement, the countersignatures and the receipts).

Without ``[network] certs`` (``insecure = true``, loopback tests) there are no identity keys:
no receipts, no countersignatures, and ε is taken from the sites' metrics.

``--resume`` reloads the checkpoint of the last completed round and continues with the next;
it refuses a state whose audit log is gone or does not verify, or lacks a round the state
holds.  Resuming a run that already completed all its rounds says so and returns at once.
Client sampling and server-side noise derive their randomness from ``(seed, round)``, a round
is only ever committed once, and a site asked to redo a round trains it from the same random
state (:class:`~securefl.engine.trainer.RoundRewind`), so the resumed run ends with the same
model as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefl.build import build_server, central_evaluator, save_final_model
from securefl.config import Config
from securefl.data import federate
from securefl.engine.history import History, RoundRecord
from securefl.engine.protection import KeepsModel
from securefl.engine.server import Server
from securefl.engine.transport import Transport
from securefl.errors import ConfigError, RunFailed
from securefl.output import append_jsonl, atomic_write, plot_accuracy, write_json
from securefl.progress import Progress, progress
from securefl.provenance import server_provenance
from securefl.runtime.auditlog import LOG, AuditLog, load_signing_key
from securefl.runtime.auditlog import verify as verify_log
from securefl.runtime.deploy import (
    check_rounds,
    identity_directory,
    load_deployment,
    server_protection,
)
from securefl.runtime.evidence import collect_countersignatures, statement
from securefl.runtime.manifest import difference, manifest_of
from securefl.runtime.receipts import collect_receipts
from securefl.runtime.store import ServerStore, model_hash
from securefl.runtime.transport import GrpcTransport

__all__ = ["ServeResult", "command", "config_fingerprint", "serve"]

_log = logging.getLogger(__name__)


def config_fingerprint(config: Config) -> str:
    """SHA-256 of everything that shapes the model (not ``[network]``, not ``rounds``)."""
    neutral = config.replace(network=type(config.network)(),
                             run=dataclasses.replace(config.run, rounds=1))
    return hashlib.sha256(neutral.to_toml().encode()).hexdigest()


@dataclass
class ServeResult:
    history: History
    parameters: np.ndarray
    state_dir: Path
    resumed_from: int | None
    complete: bool = False  #: a resume found every round already done


@dataclass(frozen=True)
class _Evidence:
    """What the server needs to collect receipts and countersignatures."""

    run: str
    identities: Mapping[str, bytes]
    timeout: float


def _metric_charges(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    return {site: {k: float(v) for k, v in m.items() if k in ("epsilon", "delta")}
            for site, m in metrics.items() if "epsilon" in m}


def serve(config: Config, *, state_dir: str | Path | None = None, resume: bool = False,
          transport: Transport | None = None) -> ServeResult:
    """Run (or resume) the federation described by ``config`` until ``[run] rounds``."""
    net = config.network
    check_rounds(config)
    state = Path(state_dir or net.state_dir)
    store = ServerStore(state)
    try:
        store.bind(config_fingerprint(config), resume=resume)
        last = store.last_completed() if resume else None
        if last is not None and last >= config.run.rounds:
            _log.warning("run %s is already complete (%d of %d rounds); nothing to resume",
                         config.run.name, last, config.run.rounds)
            saved = store.load_checkpoint(last)
            return ServeResult(History(), saved["model"].astype(np.float32), state, last,
                               complete=True)
        if net.audit and last is not None and not (state / LOG).exists():
            raise ConfigError(f"{state}: holds {last} completed rounds but its audit log is "
                              "gone; refusing to resume")
        audit = (AuditLog(state, signing_key=load_signing_key(state / "keys" / "audit.key"))
                 if net.audit else None)
        atomic_write(state / "config.toml", config.to_toml())
        data = federate(config.data, seed=config.run.seed)
        sites = sorted(net.allowlist)
        # the sites build the same model from the config: HE layer selections agree
        evaluator = central_evaluator(config, data)
        protection = server_protection(config, sites, layout=evaluator.layout)
        evidence = (_Evidence(store.run_id().hex(), identity_directory(config, sites),
                              min(net.round_timeout, 60.0)) if net.certs is not None else None)
        manifest = manifest_of(config, evaluator.model)
        grpc_transport = transport or GrpcTransport(net, sites=sites, manifest=manifest)
        if isinstance(grpc_transport, GrpcTransport) and (
                grpc_transport.manifest is None or difference(
                    manifest, grpc_transport.manifest, here="", there="") is not None):
            raise ConfigError("the transport given to serve() must check the sites against "
                              "this configuration's manifest (GrpcTransport(manifest=...))")
        write_json(state / "provenance.json", server_provenance(config, data, evaluator.model))
        hooks: list[Any] = []
        if config.privacy.mode in ("dp_fedavg", "distributed"):
            # the Gaussian noise on the sum is the server's part; clipping and the
            # authoritative ledger are the sites'
            from securefl.privacy import build_privacy

            privacy = build_privacy(config, run_dir=state / "privacy", client_ids=sites,
                                    num_examples={}, deployment=True)
            if privacy is not None:
                hooks.extend(privacy.server_hooks)
        server, _ = build_server(config, grpc_transport, protection, data, hooks=hooks,
                                 timeout=net.round_timeout, evaluator=evaluator,
                                 run_id=store.run_id(), num_clients=len(sites))
        optimizer = server.optimizer
        if last is not None:
            saved = store.load_checkpoint(last)
            server.parameters = saved.pop("model").astype(np.float32)
            if isinstance(protection, KeepsModel):  # HE: the encrypted global model
                protection.load_state(saved.pop("protection", np.zeros(0, np.uint8)).tobytes())
            optimizer.load_state({k.removeprefix("optimizer."): v for k, v in saved.items()
                                  if k.startswith("optimizer.")})
            if "aggregator" in saved:
                server.aggregator_state = saved["aggregator"]
            _log.info("resuming after round %d", last)
        if isinstance(grpc_transport, GrpcTransport):
            wanted = net.min_connected or len(sites)
            ready = grpc_transport.wait_for_clients(wanted, timeout=net.connect_timeout)
            _log.info("%d of %d sites connected: %s", len(ready), len(sites), ready)
            if len(ready) < wanted:  # no round that cannot finish, no charge for one
                grpc_transport.close(notify=False)
                raise RunFailed(f"only {len(ready)} of the {wanted} sites needed "
                                f"([network] min_connected) connected within "
                                f"{net.connect_timeout:g} s ({', '.join(ready) or 'none'}); "
                                "no round was started")
        if last is not None and audit is not None:
            _audit_resume(audit, store, server, evidence, state, last)
        rows = [r["metrics"] for r in store.rounds() if r["status"] == "completed"]
        for row in rows:  # a decline is for the budget, which only shrinks: it lasts
            server.exhausted.update(row.get("declined") or {})
        try:
            with progress("round", config.run.rounds, log=_log, completed=last or 0) as bar:
                for rnd in range((last or 0) + 1, config.run.rounds + 1):
                    if server.stop_before(rnd):
                        break
                    if isinstance(grpc_transport, GrpcTransport):
                        _await_round(grpc_transport, server, config, rnd)
                    record = _run_round(server, store, audit, config, rnd, evidence)
                    rows.append(record.to_json())
                    append_jsonl(state / "metrics.jsonl", rows)
                    _report_round(bar, record)
        except BaseException:
            # stopped early (Ctrl-C, an error): the sites keep waiting for a --resume
            if isinstance(grpc_transport, GrpcTransport):
                grpc_transport.close(notify=False)
            raise
        grpc_transport.close()
        if isinstance(protection, KeepsModel):
            # the server holds the final model only encrypted; each site decrypts model.he
            atomic_write(state / "model.he", protection.save_state())
        else:
            save_final_model(state, config, evaluator, server.parameters)
        plot_accuracy(History([RoundRecord(round=r["round"], accuracy=r.get("accuracy"),
                                           federated_accuracy=r.get("federated_accuracy"))
                               for r in rows]), state / "accuracy.png", title=config.run.name)
        final = server.history.final
        write_json(state / "summary.json", {
            "name": config.run.name, "rounds": config.run.rounds, "resumed_from": last,
            "final_accuracy": final.accuracy if final else None,
            # HE: the server holds only the encrypted model (model.he), never a plaintext one
            "model_sha256": (None if isinstance(protection, KeepsModel)
                             else model_hash(server.parameters)),
            "epsilon_spent": store.spent(), "stopped": server.history.stopped,
            "protection": config.protection.kind, "aggregation": config.aggregation.rule})
        return ServeResult(server.history, server.parameters, state, last)
    finally:
        store.close()


def _audit_resume(audit: AuditLog, store: ServerStore, server: Server,
                  evidence: _Evidence | None, state: Path, last: int) -> None:
    """Record the resume; first close a round committed just before a crash cut its entry.

    Refuses a log that lacks a completed round other than the last (cut or rewritten).
    """
    ends = [e["data"]["round"] for e in verify_log(state).events if e["event"] == "round_end"]
    completed = [r["round"] for r in store.rounds() if r["status"] == "completed"]
    missing = sorted(set(completed) - set(ends) - {last})
    if missing:
        raise ConfigError(f"{state / LOG}: has no round_end for completed rounds {missing}; "
                          "refusing to resume")
    if not ends or ends[-1] < last:
        row = next(r for r in store.rounds() if r["round"] == last)
        details = store.details(last)
        _audit_round_end(audit, server, evidence, last, clients=row["metrics"].get("clients", []),
                         charged={s: d["epsilon_charged"] for s, d in details.items()
                                  if "epsilon_charged" in d},
                         receipts={s: d["receipts"] for s, d in details.items()
                                   if "receipts" in d},
                         model_sha256=row["model_sha256"],
                         accuracy=row["metrics"].get("accuracy"), recovered=True,
                         dropped=row["dropped"], epsilon_spent=store.spent())
    audit.append("resume", after_round=last)


def _audit_round_end(audit: AuditLog, server: Server, evidence: _Evidence | None, rnd: int, *,
                     clients: list[str], charged: Mapping[str, float],
                     receipts: Mapping[str, list[str]], model_sha256: str,
                     accuracy: float | None,
                     **data: Any) -> None:
    """Append ``round_end`` with the statement the sites countersigned (when they can)."""
    if evidence is None:
        audit.append("round_end", round=rnd, clients=clients, epsilon_charged=dict(charged),
                     model_sha256=model_sha256, accuracy=accuracy, **data)
        return
    claim = statement(run=evidence.run, round=rnd, prev=audit.head, model_sha256=model_sha256,
                      participants=clients, epsilon_charged=charged, accuracy=accuracy)
    signatures = collect_countersignatures(
        server.transport, claim, sites=server.transport.client_ids(),
        identities=evidence.identities, timeout=evidence.timeout)
    audit.append("round_end", round=rnd, clients=claim["participants"],
                 epsilon_charged=claim["epsilon_charged"], model_sha256=model_sha256,
                 accuracy=claim["accuracy"], statement=claim, countersignatures=signatures,
                 receipts=dict(receipts), **data)


def _await_round(transport: GrpcTransport, server: Server, config: Config, rnd: int) -> None:
    """Start round ``rnd`` only when the sampled sites that are connected can finish it.

    Under secure aggregation a site that is not connected shrinks the round
    (:mod:`securefl.secagg.tolerance`); a round too small would abort after the others had
    trained and been charged.  The server waits up to ``[network] connect_timeout`` for the
    missing sites, then stops without starting the round (the state stays for ``--resume``).
    """
    if config.protection.kind != "secagg":
        return
    from securefl.secagg.tolerance import round_problem

    sampled = server.sampler(transport.client_ids(), server.round_rng(rnd))
    deadline = time.monotonic() + config.network.connect_timeout
    while True:
        present = sorted(set(transport.connected()) & set(sampled))
        problem = round_problem(len(present), config.protection.secagg)
        left = deadline - time.monotonic()
        if problem is None:
            return
        if left <= 0:
            raise RunFailed(f"round {rnd} not started: {len(present)} of its {len(sampled)} "
                            f"sites connected ({', '.join(present) or 'none'}) within "
                            f"{config.network.connect_timeout:g} s and {problem}; no site was "
                            "charged; restart with --resume when the sites are back")
        _log.warning("round %d waits: %d of its %d sites connected and %s", rnd, len(present),
                     len(sampled), problem)
        transport.wait_for_clients(len(transport.connected()) + 1, timeout=min(left, 10.0))


def _run_round(server: Server, store: ServerStore, audit: AuditLog | None, config: Config,
               rnd: int, evidence: _Evidence | None) -> RoundRecord:
    participants = server.sampler(server.transport.client_ids(), server.round_rng(rnd))
    store.begin_round(rnd, participants)
    if audit is not None:
        audit.append("round_start", round=rnd, participants=participants,
                     protection=config.protection.kind, aggregator=config.aggregation.rule,
                     privacy=config.privacy.mode, model_sha256=model_hash(server.parameters))
    before = store.spent()
    record = server.run_round(rnd)
    if evidence is not None and config.privacy.mode != "none":
        receipts = collect_receipts(server.transport, run=evidence.run, round=rnd,
                                    after=store.receipt_heads(),
                                    sites=server.transport.client_ids(),
                                    identities=evidence.identities, timeout=evidence.timeout)
        charges: dict[str, dict[str, Any]] = {}
        for site, segment in receipts.items():
            last = segment[-1][1]
            charges[site] = {"epsilon": last["epsilon_total"], "delta": last["delta"],
                             "receipts": [raw for raw, _ in segment]}
            if last["round"] == rnd:
                charges[site]["epsilon_charged"] = last["epsilon_charged"]
        charged = {site: float(c["epsilon_charged"]) for site, c in charges.items()
                   if "epsilon_charged" in c}
    elif evidence is None:
        charges = _metric_charges(record.client_metrics)
        charged = {site: c["epsilon"] - before.get(site, 0.0) for site, c in charges.items()}
    else:
        charges, charged = {}, {}
    state = {"model": server.parameters,
             **{f"optimizer.{k}": v for k, v in server.optimizer.state().items()}}
    if isinstance(server.aggregator_state, np.ndarray):
        state["aggregator"] = server.aggregator_state
    if isinstance(server.protection, KeepsModel):
        state["protection"] = np.frombuffer(server.protection.save_state(), dtype=np.uint8)
    digest = store.complete_round(rnd, state=state, dropped=record.dropped,
                                  metrics=record.to_json(), charges=charges)
    if audit is not None:
        _audit_round_end(audit, server, evidence, rnd, clients=record.clients,
                         charged=charged, receipts={s: c["receipts"] for s, c in charges.items()
                                                    if "receipts" in c},
                         model_sha256=digest, accuracy=record.to_json().get("accuracy"),
                         dropped=record.dropped, declined=record.declined,
                         rejected=record.rejected, aborted=record.aborted,
                         epsilon_spent=store.spent())
    return record


def _report_round(bar: Progress, record: RoundRecord) -> None:
    """Normal progress at INFO (or on the bar); an aborted round is a WARNING."""
    accuracy = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
    bar.advance(status=f"{len(record.clients)} sites, accuracy {accuracy}")
    if record.aborted:
        _log.warning("round %d aborted: %s", record.round, record.aborted)


def command(args: argparse.Namespace) -> int:
    """``securefl server CONFIG [--resume] [--out STATE_DIR]``."""
    config = load_deployment(args.config)
    if config.run.threat_model:
        from securefl.threat import require

        require(config, deployment="network")
    if not config.network.allowlist:
        raise ConfigError(f"{args.config}: [network.allowlist] names no site")
    result = serve(config, state_dir=args.out, resume=args.resume)
    if result.complete:
        print(f"run {config.run.name} is already complete ({result.resumed_from} rounds); "
              f"model {model_hash(result.parameters)}; state directory {result.state_dir}")
        return 0
    final = result.history.final
    accuracy = "n/a" if final is None or final.accuracy is None else f"{final.accuracy:.4f}"
    print(f"final accuracy {accuracy}; model {model_hash(result.parameters)}; "
          f"state directory {result.state_dir}")
    return 0
