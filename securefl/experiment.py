"""Simulation recipe: config -> data, model, clients, protection, server -> run directory.

``securefl run CONFIG`` calls :func:`run_simulation`, which writes a run directory with the
resolved ``config.toml``, ``metrics.jsonl`` (one JSON object per round), the final model as
safetensors, ``summary.json`` and ``accuracy.png``.  Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefl.config import Config, load_config
from securefl.data import Dataset, FederatedData, federate
from securefl.engine.client import Client, UpdateHook
from securefl.engine.history import History, RoundRecord
from securefl.engine.optim import build_server_optimizer
from securefl.engine.server import Sampler, Server
from securefl.engine.simulation import DropSchedule, InProcessTransport
from securefl.engine.trainer import LocalTrainer, Trainer, evaluate_model
from securefl.models import build_model
from securefl.params import Layout, flatten, unflatten
from securefl.protections import build_protection
from securefl.rundir import append_jsonl, atomic_write, save_model, write_json

__all__ = ["RunResult", "Simulation", "build_simulation", "command", "root_trainer",
           "run_simulation"]


@dataclass
class Simulation:
    """Everything a simulated federation is made of, exposed for harnesses and tests."""

    config: Config
    data: FederatedData
    model: torch.nn.Module  # the server's copy, used for central evaluation
    layout: Layout
    trainers: dict[str, Trainer]
    clients: dict[str, Client]
    transport: InProcessTransport
    server: Server
    privacy: Any = None

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.layout)
        test = self.data.test
        return evaluate_model(self.model, torch.from_numpy(test.features),
                              torch.from_numpy(test.labels))


def build_simulation(config: Config, *, run_dir: Path | None = None,
                     data: FederatedData | None = None,
                     server_hooks: Sequence[Any] = (),
                     client_hooks: Mapping[str, Sequence[UpdateHook]] | None = None,
                     schedule: DropSchedule | None = None) -> Simulation:
    """Assemble an in-process federation from ``config`` (nothing runs yet).

    ``data`` replaces the configured dataset (e.g. with poisoned client shards);
    ``server_hooks`` and ``client_hooks`` inject attacks or defenses; ``schedule`` drops
    clients deterministically (see :class:`InProcessTransport`).
    """
    seed = config.run.seed
    data = data if data is not None else federate(config.data, seed=seed)
    model = build_model(config.model, data.shape, data.num_classes, seed=seed)
    layout = Layout.of(model)
    ids = list(data.clients)

    privacy = None
    hooks: list[Any] = list(server_hooks)
    if config.privacy.mode != "none":
        from securefl.privacy import build_privacy

        privacy = build_privacy(config, run_dir=run_dir, client_ids=ids,
                                num_examples={c: len(d.train) for c, d in data.clients.items()})
        hooks.extend(privacy.server_hooks)

    server_protection, client_protections = build_protection(config, ids, layout=layout)
    trainers: dict[str, Trainer] = {}
    clients: dict[str, Client] = {}
    for index, cid in enumerate(ids):
        local = build_model(config.model, data.shape, data.num_classes, seed=seed)
        c = config.client
        trainer: Trainer = LocalTrainer(
            local, data.clients[cid].train, data.clients[cid].val, epochs=c.epochs,
            batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer, momentum=c.momentum,
            weight_decay=c.weight_decay, seed=int(np.random.SeedSequence([seed, index])
                                                  .generate_state(1)[0]))
        update_hooks = list((client_hooks or {}).get(cid, ()))
        if privacy is not None:
            trainer = privacy.wrap_trainer(cid, trainer)
            update_hooks = [*privacy.client_hooks, *update_hooks]
        trainers[cid] = trainer
        clients[cid] = Client(cid, trainer, client_protections[cid], update_hooks=update_hooks)

    sim_cfg = config.simulation
    transport = InProcessTransport(clients, wire=sim_cfg.wire, workers=sim_cfg.workers,
                                   dropout=sim_cfg.dropout, schedule=schedule, seed=seed)
    s = config.server
    optimizer = build_server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum,
                                       beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    simulation = Simulation(config, data, model, layout, trainers, clients, transport,
                            server=None, privacy=privacy)  # type: ignore[arg-type]
    aggregator = config.aggregation.build()
    reference = None
    if getattr(aggregator, "needs_reference", False):
        root = root_trainer(config, data, count=getattr(aggregator, "root_examples", 100))
        reference = lambda params: root.fit(params, round=0)[0].delta  # noqa: E731
    simulation.server = Server(
        transport, server_protection, aggregator, optimizer, reference_update=reference,
        parameters=flatten(model), seed=seed,
        sampler=Sampler(count=s.clients_per_round, fraction=s.fraction),
        min_clients=s.min_clients, timeout=s.timeout,
        central_evaluator=simulation.evaluate if s.evaluate in ("central", "both") else None,
        federated_evaluation=s.evaluate in ("federated", "both"), hooks=hooks)
    return simulation


def root_trainer(config: Config, data: FederatedData, *, count: int) -> LocalTrainer:
    """A trainer on the server's small clean root dataset (FLTrust, Cao et al. 2021).

    In simulation the root set is ``count`` examples drawn, with a seeded RNG, from the
    pooled client training data: the same distribution, as the paper assumes.
    """
    rng = np.random.default_rng([config.run.seed, 0x2007])
    pooled = [c.train for c in data.clients.values()]
    features = np.concatenate([d.features for d in pooled])
    labels = np.concatenate([d.labels for d in pooled])
    pick = np.sort(rng.choice(len(labels), size=min(count, len(labels)), replace=False))
    root = Dataset(features[pick], labels[pick], data.num_classes, "root")
    c = config.client
    model = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed)
    return LocalTrainer(model, root, root.subset(np.arange(0)), epochs=c.epochs,
                        batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                        momentum=c.momentum, weight_decay=c.weight_decay, seed=config.run.seed)


@dataclass
class RunResult:
    history: History
    parameters: np.ndarray
    run_dir: Path | None


def run_simulation(config: Config, *, out_dir: str | Path | None = None,
                   on_round: Callable[[RoundRecord], None] | None = None,
                   **build_options: Any) -> RunResult:
    """Run ``config.run.rounds`` rounds; with ``out_dir``, write the run directory."""
    if config.run.threat_model:
        from securefl.threat import require

        require(config)
    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.toml", config.to_toml())
    started = time.perf_counter()
    sim = build_simulation(config, run_dir=run_dir, **build_options)
    setup_seconds = time.perf_counter() - started
    rows: list[dict[str, Any]] = []

    def record(rec: RoundRecord) -> None:
        rows.append(rec.to_json())
        if run_dir is not None:
            append_jsonl(run_dir / "metrics.jsonl", rows)
        if on_round is not None:
            on_round(rec)

    history = sim.server.run(config.run.rounds, on_round=record)
    sim.transport.close()
    params = sim.server.parameters
    if run_dir is not None:
        unflatten(sim.model, params, sim.layout)
        save_model(run_dir / "model.safetensors",
                   {k: v.detach().numpy() for k, v in sim.model.state_dict().items()},
                   metadata={"format": "pt-state-dict", "model": config.model.name})
        if sim.privacy is not None and hasattr(sim.privacy, "finalize"):
            sim.privacy.finalize(run_dir)
        write_json(run_dir / "summary.json", _summary(config, history, setup_seconds,
                                                      time.perf_counter() - started))
        plot_accuracy(history, run_dir / "accuracy.png", title=config.run.name)
    return RunResult(history, params, run_dir)


def _summary(config: Config, history: History, setup: float, total: float) -> dict[str, Any]:
    final = history.final
    accuracies = [a for a in history.metric("accuracy") if a is not None]
    return {
        "name": config.run.name, "rounds": len(history.rounds),
        "final_accuracy": final.accuracy if final else None,
        "final_loss": final.loss if final else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "protection": config.protection.kind, "aggregation": config.aggregation.rule,
        "privacy": config.privacy.mode, "seed": config.run.seed,
        "aborted_rounds": [r.round for r in history.rounds if r.aborted],
        "setup_seconds": round(setup, 4), "total_seconds": round(total, 4),
    }


def plot_accuracy(history: History, path: Path, *, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [r.round for r in history.rounds]
    for name, label in (("accuracy", "test accuracy"), ("federated_accuracy", "federated")):
        values = [np.nan if v is None else v for v in history.metric(name)]
        if not all(np.isnan(values)):
            ax.plot(rounds, values, marker="o", markersize=3, label=label)
    ax.set(xlabel="round", ylabel="accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


# ----------------------------------------------------------------------------- CLI
def command(args: Any) -> int:
    config = load_config(args.config)
    if args.rounds is not None:
        config = config.replace(run=dataclasses.replace(config.run, rounds=args.rounds))
    if args.seed is not None:
        config = config.replace(run=dataclasses.replace(config.run, seed=args.seed))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{config.run.name}-{stamp}"
    rounds = config.run.rounds
    quiet = getattr(args, "quiet", False)

    def line(rec: RoundRecord) -> str:
        acc = "n/a" if rec.accuracy is None else f"{rec.accuracy:.4f}"
        loss = "n/a" if rec.loss is None else f"{rec.loss:.4f}"
        note = f" aborted: {rec.aborted}" if rec.aborted else ""
        return (f"round {rec.round}/{rounds} accuracy={acc} loss={loss} "
                f"clients={len(rec.clients)} {rec.seconds:.2f}s{note}")

    if quiet:
        result = run_simulation(config, out_dir=out)
    elif sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), transient=False) as bar:
            task = bar.add_task(config.run.name, total=rounds, status="")

            def advance(rec: RoundRecord) -> None:
                acc = "" if rec.accuracy is None else f"accuracy {rec.accuracy:.4f}"
                bar.update(task, advance=1, status=acc if not rec.aborted else "aborted")

            result = run_simulation(config, out_dir=out, on_round=advance)
    else:
        result = run_simulation(config, out_dir=out,
                                on_round=lambda rec: print(line(rec), file=sys.stderr, flush=True))
    final = result.history.final
    accuracy = "n/a" if final is None or final.accuracy is None else f"{final.accuracy:.4f}"
    print(f"final accuracy {accuracy}; run directory {out}")
    return 0
