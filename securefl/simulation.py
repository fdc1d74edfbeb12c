"""The in-process simulation: config -> a federation in one process -> run directory.

``securefl run CONFIG`` calls :func:`run_simulation`, which writes a run directory with the
resolved ``config.toml``, ``metrics.jsonl`` (one JSON object per round), the final model as
safetensors, ``provenance.json``, ``summary.json`` and ``accuracy.png``.  Every file is
written atomically.  The parties themselves are built by :mod:`securefl.build`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefl.aggregation import Aggregator
from securefl.build import (
    Simulation,
    aggregator_for,
    build_protection,
    build_server,
    check_feasible,
    load_config,
    local_trainer,
    save_final_model,
)
from securefl.config import Config
from securefl.data import FederatedData, federate
from securefl.engine.client import Client, UpdateHook
from securefl.engine.history import History, RoundRecord
from securefl.engine.protection import KeepsModel
from securefl.engine.server import ServerHook
from securefl.engine.simulation import DropSchedule, InProcessTransport
from securefl.engine.trainer import RoundRewind, Trainer, torch_threads
from securefl.errors import ConfigError
from securefl.models import OwnModel
from securefl.objective import Objective
from securefl.output import (
    append_jsonl,
    atomic_write,
    failure,
    plot_accuracy,
    run_directory,
    summary,
    write_json,
)
from securefl.provenance import provenance

__all__ = ["RunResult", "Simulation", "build_simulation", "command", "run_simulation"]


def build_simulation(config: Config, *, run_dir: Path | None = None,
                     data: FederatedData | None = None,
                     server_hooks: Sequence[ServerHook] = (),
                     client_hooks: Mapping[str, Sequence[UpdateHook]] | None = None,
                     schedule: DropSchedule | None = None,
                     root_data: FederatedData | None = None,
                     model: OwnModel | None = None,
                     aggregator: Aggregator | None = None,
                     objective: Objective | None = None) -> Simulation:
    """Assemble an in-process federation from ``config`` (nothing runs yet).

    ``data`` replaces the configured dataset (e.g. with poisoned client shards; then pass
    the clean one as ``root_data`` for the server's FLTrust root set);
    ``server_hooks`` and ``client_hooks`` inject attacks or defenses; ``schedule`` drops
    clients deterministically (see :class:`InProcessTransport`); ``model`` is the users'
    own (a module or a factory, see :mod:`securefl.own`) in place of ``[model]``, and
    ``objective`` its own loss and training step (:mod:`securefl.objective`);
    ``aggregator`` is the run's rule when the caller has built it already.
    """
    if config.simulation.backend == "ray":  # the sites in Ray actors
        from securefl.ray_simulation import build_ray_simulation

        return build_ray_simulation(config, run_dir=run_dir, server_hooks=server_hooks,
                                    schedule=schedule, root_data=root_data, data=data,
                                    client_hooks=client_hooks, model=model,
                                    aggregator=aggregator, objective=objective)
    data = data if data is not None else federate(config.data, seed=config.run.seed)
    ids = list(data.clients)
    privacy = None
    hooks: list[ServerHook] = list(server_hooks)
    if config.privacy.mode != "none":
        from securefl.privacy import build_privacy

        privacy = build_privacy(config, run_dir=run_dir, client_ids=ids,
                                num_examples={c: len(d.train) for c, d in data.clients.items()})
        if privacy is not None:
            hooks.extend(privacy.server_hooks)

    local = {cid: local_trainer(config, data, cid, model=model, objective=objective)
             for cid in ids}
    server_protection, client_protections = build_protection(config, ids,
                                                             layout=local[ids[0]].layout)
    trainers: dict[str, Trainer] = {}
    clients: dict[str, Client] = {}
    for cid in ids:
        trainer: Trainer = RoundRewind(local[cid])  # a redone round trains the same batches
        update_hooks = list((client_hooks or {}).get(cid, ()))
        if privacy is not None:  # a private trainer answers a redone round from its memo
            trainer = privacy.wrap_trainer(cid, local[cid])
            update_hooks = [*privacy.client_hooks, *update_hooks]
        trainers[cid] = trainer
        clients[cid] = Client(cid, trainer, client_protections[cid], update_hooks=update_hooks,
                              evaluate=config.server.evaluate in ("federated", "both"))

    sim_cfg = config.simulation
    transport = InProcessTransport(clients, wire=sim_cfg.wire, workers=sim_cfg.workers,
                                   dropout=sim_cfg.dropout, schedule=schedule,
                                   seed=config.run.seed)
    server, evaluator = build_server(config, transport, server_protection, data, hooks=hooks,
                                     root_data=root_data, model=model, aggregator=aggregator,
                                     objective=objective)
    if privacy is not None and privacy.sampling_seed is not None:
        server.seed = privacy.sampling_seed  # DP-FedAvg's secret sample: not from the config
    view = None
    if isinstance(server_protection, KeepsModel):
        # HE: the server never holds the model.  The experimenter holds the sites' key, so
        # "central" test accuracy is measured on the model a site decrypts.
        from securefl.he import site_view

        view = site_view(server_protection, client_protections[ids[0]],  # type: ignore[arg-type]
                         run=server.run_id, initial=server.parameters)
        if server.central_evaluator is not None:
            server.central_evaluator = lambda _server_copy: evaluator(view())
    return Simulation(config, data, trainers, clients, transport, server, evaluator, privacy,
                      view)


@dataclass
class RunResult:
    history: History
    parameters: np.ndarray
    run_dir: Path | None


def run_simulation(config: Config, *, out_dir: str | Path | None = None,
                   on_round: Callable[[RoundRecord], None] | None = None,
                   **build_options: Any) -> RunResult:
    """Run ``config.run.rounds`` rounds; with ``out_dir``, write the run directory."""
    aggregator = build_options.pop("aggregator", None) or aggregator_for(config)
    if config.run.threat_model:
        from securefl.threat import require

        require(config, aggregator=aggregator)
    build_options["aggregator"] = aggregator
    data = build_options.get("data")
    # what the config decides about every round, before anything is written to out_dir
    check_feasible(config, aggregator,
                   num_clients=len(data.clients) if data is not None else config.data.num_clients)
    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(config.simulation.torch_threads()):
        return _simulate(config, run_dir, on_round, build_options)


def _simulate(config: Config, run_dir: Path | None,
              on_round: Callable[[RoundRecord], None] | None,
              build_options: Mapping[str, Any]) -> RunResult:
    started = time.perf_counter()
    sim = build_simulation(config, run_dir=run_dir, **build_options)
    setup_seconds = time.perf_counter() - started
    if run_dir is not None:  # written once the run is built: a refused config leaves none
        atomic_write(run_dir / "config.toml", config.to_toml())
        write_json(run_dir / "provenance.json", provenance(sim.config, sim.data, sim.model))
    rows: list[dict[str, Any]] = []

    def record(rec: RoundRecord) -> None:
        row = rec.to_json()
        rows.append(row if sim.privacy is None else sim.privacy.public_record(row))
        if run_dir is not None:
            append_jsonl(run_dir / "metrics.jsonl", rows)
        if on_round is not None:
            on_round(rec)

    try:
        history = sim.server.run(config.run.rounds, on_round=record)
        params = sim.parameters()
        if run_dir is not None and sim.privacy is not None:
            sim.privacy.finalize(run_dir)  # on Ray: from the actors' ledgers, before closing
    finally:
        sim.transport.close()
    if run_dir is not None:
        save_final_model(run_dir, config, sim.evaluator, params)
        write_json(run_dir / "summary.json", summary(config, history, setup_seconds,
                                                      time.perf_counter() - started))
        plot_accuracy(history, run_dir / "accuracy.png", title=config.run.name)
    return RunResult(history, params, run_dir)


# ----------------------------------------------------------------------------- CLI
def command(args: Any) -> int:
    config = load_config(args.config)
    if args.rounds is not None:
        config = config.replace(run=dataclasses.replace(config.run, rounds=args.rounds))
    if args.seed is not None:
        config = config.replace(run=dataclasses.replace(config.run, seed=args.seed))
    out = run_directory(args.out, name=config.run.name,
                        overwrite=getattr(args, "overwrite", False))
    try:
        result = _run_command(config, out)
    except ConfigError as exc:  # checks that run after loading: name the file too
        text = str(exc)
        raise ConfigError(text if text.startswith(str(args.config)) else
                          f"{args.config}: {text}") from None
    final = result.history.final
    accuracy = "n/a" if final is None or final.accuracy is None else f"{final.accuracy:.4f}"
    print(f"final accuracy {accuracy}; run directory {out}")
    failed = failure(result.history)
    if failed is not None:
        print(f"securefl: the run failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _run_command(config: Config, out: Path) -> RunResult:
    """The run with a bar on a terminal, one INFO line per round elsewhere (none under -q)."""
    from securefl.progress import progress

    with progress(f"{config.run.name}: round", config.run.rounds,
                  log=logging.getLogger(__name__)) as bar:
        def advance(rec: RoundRecord) -> None:
            acc = "n/a" if rec.accuracy is None else f"{rec.accuracy:.4f}"
            loss = "n/a" if rec.loss is None else f"{rec.loss:.4f}"
            bar.advance(status=f"accuracy={acc} loss={loss} clients={len(rec.clients)} "
                        f"{rec.seconds:.2f}s" + (f" aborted: {rec.aborted}" if rec.aborted else ""))

        return run_simulation(config, out_dir=out, on_round=advance)
