"""``securefl server CONFIG [--resume]``: the federation server over gRPC, durable and audited.

Each round ``t`` (the engine's :class:`~securefl.engine.server.Server` does the work; this
module adds what a long-lived process needs):

1. audit ``round_start`` (participants sampled from ``(seed, t)``, protection, aggregator,
   hash of the model the round starts from) and record the round as started in SQLite;
2. ``Server.run_round(t)`` over :class:`~securefl.runtime.transport.GrpcTransport`;
3. checkpoint model + optimizer state atomically and mark the round completed, with the ε
   each site reported (the server's copy of the ledger) — see :mod:`securefl.runtime.store`;
4. audit ``round_end`` (who contributed, who dropped/declined/was rejected, ε charged, new
   model hash, accuracy).

``--resume`` reloads the checkpoint of the last completed round and continues with the next.
Client sampling and server-side noise derive their randomness from ``(seed, round)``, a round
is only ever committed once, and a site asked to redo a round trains it from the same random
state (:class:`~securefl.runtime.client.RoundRewind`), so the resumed run ends with the same
model as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config, load_config
from securefl.data import federate
from securefl.engine.history import History, RoundRecord
from securefl.engine.protection import KeepsModel
from securefl.engine.server import Server
from securefl.engine.transport import Transport
from securefl.errors import ConfigError
from securefl.experiment import (
    build_server,
    central_evaluator,
    plot_accuracy,
    save_final_model,
)
from securefl.rundir import append_jsonl, atomic_write, write_json
from securefl.runtime.auditlog import AuditLog, load_signing_key
from securefl.runtime.auditlog import verify as verify_log
from securefl.runtime.deploy import server_protection
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


def _charges(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {site: {k: float(v) for k, v in m.items() if k in ("epsilon", "delta")}
            for site, m in metrics.items() if "epsilon" in m}


def serve(config: Config, *, state_dir: str | Path | None = None, resume: bool = False,
          transport: Transport | None = None) -> ServeResult:
    """Run (or resume) the federation described by ``config`` until ``[run] rounds``."""
    net = config.network
    state = Path(state_dir or net.state_dir)
    store = ServerStore(state)
    try:
        store.bind(config_fingerprint(config), resume=resume)
        audit = (AuditLog(state, signing_key=load_signing_key(state / "keys" / "audit.key"))
                 if net.audit else None)
        atomic_write(state / "config.toml", config.to_toml())
        data = federate(config.data, seed=config.run.seed)
        sites = sorted(net.allowlist)
        # the sites build the same model from the config: HE layer selections agree
        evaluator = central_evaluator(config, data)
        protection = server_protection(config, sites, layout=evaluator.layout)
        grpc_transport = transport or GrpcTransport(net, sites=sites)
        hooks: list[Any] = []
        if config.privacy.mode == "dp_fedavg":
            # the Gaussian noise on the sum is the server's part; clipping and the
            # authoritative ledger are the sites'
            from securefl.privacy import build_privacy

            privacy = build_privacy(config, run_dir=state / "privacy", client_ids=sites,
                                    num_examples={}, deployment=True)
            if privacy is not None:
                hooks.extend(privacy.server_hooks)
        server, _ = build_server(config, grpc_transport, protection, data, hooks=hooks,
                                 timeout=net.round_timeout, evaluator=evaluator,
                                 run_id=store.run_id())
        optimizer = server.optimizer
        last = store.last_completed() if resume else None
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
            if audit is not None:
                _audit_resume(audit, store, state, last)
        if isinstance(grpc_transport, GrpcTransport):
            wanted = net.min_connected or len(sites)
            ready = grpc_transport.wait_for_clients(wanted, timeout=net.connect_timeout)
            _log.info("%d of %d sites connected: %s", len(ready), len(sites), ready)
        rows = [r["metrics"] for r in store.rounds() if r["status"] == "completed"]
        try:
            for rnd in range((last or 0) + 1, config.run.rounds + 1):
                _run_round(server, store, audit, config, rnd)
                rows.append(server.history.rounds[-1].to_json())
                append_jsonl(state / "metrics.jsonl", rows)
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
            "epsilon_spent": store.spent(),
            "protection": config.protection.kind, "aggregation": config.aggregation.rule})
        return ServeResult(server.history, server.parameters, state, last)
    finally:
        store.close()


def _audit_resume(audit: AuditLog, store: ServerStore, state: Path, last: int) -> None:
    """Record the resume; first close a round committed just before a crash cut its entry."""
    ends = [e["data"]["round"] for e in verify_log(state).events if e["event"] == "round_end"]
    if not ends or ends[-1] < last:
        row = next(r for r in store.rounds() if r["round"] == last)
        audit.append("round_end", round=last, recovered=True, dropped=row["dropped"],
                     clients=row["metrics"].get("clients", []), epsilon_spent=store.spent(),
                     model_sha256=row["model_sha256"])
    audit.append("resume", after_round=last)


def _run_round(server: Server, store: ServerStore, audit: AuditLog | None, config: Config,
               rnd: int) -> RoundRecord:
    participants = server.sampler(server.transport.client_ids(), server.round_rng(rnd))
    store.begin_round(rnd, participants)
    if audit is not None:
        audit.append("round_start", round=rnd, participants=participants,
                     protection=config.protection.kind, aggregator=config.aggregation.rule,
                     privacy=config.privacy.mode, model_sha256=model_hash(server.parameters))
    before = store.spent()
    record = server.run_round(rnd)
    charges = _charges(record.client_metrics)
    charged = {site: c["epsilon"] - before.get(site, 0.0) for site, c in charges.items()}
    state = {"model": server.parameters,
             **{f"optimizer.{k}": v for k, v in server.optimizer.state().items()}}
    if isinstance(server.aggregator_state, np.ndarray):
        state["aggregator"] = server.aggregator_state
    if isinstance(server.protection, KeepsModel):
        state["protection"] = np.frombuffer(server.protection.save_state(), dtype=np.uint8)
    digest = store.complete_round(rnd, state=state, dropped=record.dropped,
                                  metrics=record.to_json(), charges=charges)
    if audit is not None:
        audit.append("round_end", round=rnd, clients=record.clients, dropped=record.dropped,
                     declined=record.declined, rejected=record.rejected, aborted=record.aborted,
                     epsilon_charged=charged, epsilon_spent=store.spent(),
                     model_sha256=digest, accuracy=record.accuracy)
    _log.warning("round %d/%d: %d clients, accuracy %s%s", rnd, config.run.rounds,
                 len(record.clients), "n/a" if record.accuracy is None
                 else f"{record.accuracy:.4f}",
                 f" (aborted: {record.aborted})" if record.aborted else "")
    return record


def command(args: argparse.Namespace) -> int:
    """``securefl server CONFIG [--resume] [--out STATE_DIR]``."""
    config = load_config(args.config)
    if config.run.threat_model:
        from securefl.threat import require

        require(config, deployment="network")
    if not config.network.allowlist:
        raise ConfigError(f"{args.config}: [network.allowlist] names no site")
    result = serve(config, state_dir=args.out, resume=args.resume)
    final = result.history.final
    accuracy = "n/a" if final is None or final.accuracy is None else f"{final.accuracy:.4f}"
    print(f"final accuracy {accuracy}; model {model_hash(result.parameters)}; "
          f"state directory {result.state_dir}")
    return 0
