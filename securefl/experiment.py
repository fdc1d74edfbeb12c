"""Simulation recipe: config -> data, model, clients, protection, server -> run directory.

``securefl run CONFIG`` calls :func:`run_simulation`, which writes a run directory with the
resolved ``config.toml``, ``metrics.jsonl`` (one JSON object per round), the final model as
safetensors, ``summary.json`` and ``accuracy.png``.  Every file is written atomically.
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
import torch

from securefl.aggregation import Aggregator, min_clients
from securefl.config import Config, load_config
from securefl.data import Dataset, FederatedData, federate
from securefl.engine.client import Client, UpdateHook
from securefl.engine.history import History, RoundRecord
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import KeepsModel, ServerProtection
from securefl.engine.server import Sampler, Server
from securefl.engine.simulation import DropSchedule, InProcessTransport
from securefl.engine.trainer import (
    LocalTrainer,
    RoundRewind,
    Trainer,
    evaluate_model,
    torch_threads,
)
from securefl.engine.transport import Transport
from securefl.errors import ConfigError
from securefl.models import OwnModel, build_model
from securefl.output import failure, plot_accuracy, run_directory, summary
from securefl.params import Layout, flatten, unflatten
from securefl.protections import build_protection
from securefl.provenance import provenance
from securefl.rundir import append_jsonl, atomic_write, save_model, write_json

__all__ = ["RunResult", "Simulation", "TestSetEvaluator", "build_server", "build_simulation",
           "central_evaluator", "command", "local_trainer", "root_trainer", "run_simulation",
           "save_final_model"]


class TestSetEvaluator:
    """Central evaluation of a parameter vector on the held-out test set (simulation only)."""

    def __init__(self, model: torch.nn.Module, test: Dataset) -> None:
        self.model, self.layout = model, Layout.of(model)
        self.features = torch.from_numpy(test.features)
        self.labels = torch.from_numpy(test.labels)

    def __call__(self, parameters: np.ndarray) -> tuple[int, float, float]:
        unflatten(self.model, parameters, self.layout)
        return evaluate_model(self.model, self.features, self.labels)


@dataclass
class Simulation:
    """Everything a simulated federation is made of, exposed for harnesses and tests."""

    config: Config
    data: FederatedData
    trainers: dict[str, Trainer]
    clients: dict[str, Client]
    transport: InProcessTransport
    server: Server
    evaluator: TestSetEvaluator
    privacy: Any = None
    #: the global model as the sites see it, when the server keeps it encrypted (HE)
    site_view: Callable[[], np.ndarray] | None = None

    def parameters(self) -> np.ndarray:
        """The current global model: the server's, or the one the sites decrypt."""
        return self.site_view() if self.site_view is not None else self.server.parameters

    @property
    def model(self) -> torch.nn.Module:  # the server's copy, used for central evaluation
        return self.evaluator.model

    @property
    def layout(self) -> Layout:
        return self.evaluator.layout


def local_trainer(config: Config, data: FederatedData, client_id: str, *,
                  model: OwnModel | None = None) -> LocalTrainer:
    """``client_id``'s trainer.  Simulation and deployment derive its seed the same way, from
    ``(seed, the client's index)``, so a networked run reproduces a simulated one.
    ``model``: the site's own (:func:`securefl.models.own_model`) instead of ``[model]``."""
    seed, c = config.run.seed, config.client
    index = list(data.clients).index(client_id)
    shard = data.clients[client_id]
    return LocalTrainer(
        build_model(config.model, data.shape, data.num_classes, seed=seed, own=model),
        shard.train,
        shard.val, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
        momentum=c.momentum, weight_decay=c.weight_decay,
        seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def central_evaluator(config: Config, data: FederatedData, *,
                      model: OwnModel | None = None) -> TestSetEvaluator:
    """The server's model, initialised from ``[run] seed``, with the held-out test set."""
    return TestSetEvaluator(build_model(config.model, data.shape, data.num_classes,
                                        seed=config.run.seed, own=model), data.test)


def build_server(config: Config, transport: Transport, protection: ServerProtection,
                 data: FederatedData, *, hooks: Sequence[Any] = (),
                 timeout: float | None = None,
                 root_data: FederatedData | None = None,
                 evaluator: TestSetEvaluator | None = None,
                 run_id: bytes | None = None,
                 model: OwnModel | None = None) -> tuple[Server, TestSetEvaluator]:
    """The round loop and the central evaluator, as both simulation and deployment build it.

    The initial model comes from ``[run] seed`` (``evaluator``: one already made by
    :func:`central_evaluator`); rules that need the server's root-data update (FLTrust) get
    one from :func:`root_trainer` on ``root_data`` (default ``data``; pass the clean data when
    the clients' shards are poisoned).
    """
    seed, s = config.run.seed, config.server
    aggregator = config.aggregation.build()
    check_feasible(config, aggregator, num_clients=len(data.clients))
    evaluator = evaluator or central_evaluator(config, data, model=model)
    reference = None
    if getattr(aggregator, "needs_reference", False):
        root = root_trainer(config, root_data or data,
                            count=getattr(aggregator, "root_examples", 100), model=model)
        reference = lambda params: root.fit(params, round=0)[0].delta  # noqa: E731
    optimizer = build_server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum,
                                       beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    server = Server(
        transport, protection, aggregator, optimizer, reference_update=reference,
        parameters=flatten(evaluator.model), seed=seed,
        sampler=Sampler(count=s.clients_per_round, fraction=s.fraction),
        min_clients=s.min_clients, timeout=s.timeout or timeout,
        central_evaluator=evaluator if s.evaluate in ("central", "both") else None,
        federated_evaluation=s.evaluate in ("federated", "both"), hooks=hooks, run_id=run_id)
    return server, evaluator


def check_feasible(config: Config, aggregator: Aggregator, *, num_clients: int) -> None:
    """What the configuration decides about every round, checked before any training: the
    sampled clients must be enough for the rule's byzantine bound, ``min_clients`` and a
    secure-aggregation round (:func:`securefl.secagg.tolerance.round_problem`)."""
    per_round = config.server.per_round(num_clients)
    sampled = f"[server] samples {per_round} of the {num_clients} clients per round"
    need = min_clients(aggregator)
    if per_round < need:
        raise ConfigError(f"[aggregation] rule {config.aggregation.rule!r} ({aggregator!r}) "
                          f"needs at least {need} updates per round, but {sampled}")
    if config.server.min_clients > per_round:
        raise ConfigError(f"[server] min_clients = {config.server.min_clients}, but {sampled}: "
                          "every round would abort")
    if config.protection.kind == "secagg":
        from securefl.secagg.tolerance import round_problem

        if (problem := round_problem(per_round, config.protection.secagg)) is not None:
            raise ConfigError(f"[protection] kind = \"secagg\": {problem}, but {sampled}: "
                              "every round would abort after the clients trained")


def build_simulation(config: Config, *, run_dir: Path | None = None,
                     data: FederatedData | None = None,
                     server_hooks: Sequence[Any] = (),
                     client_hooks: Mapping[str, Sequence[UpdateHook]] | None = None,
                     schedule: DropSchedule | None = None,
                     root_data: FederatedData | None = None,
                     model: OwnModel | None = None) -> Simulation:
    """Assemble an in-process federation from ``config`` (nothing runs yet).

    ``data`` replaces the configured dataset (e.g. with poisoned client shards; then pass
    the clean one as ``root_data`` for the server's FLTrust root set);
    ``server_hooks`` and ``client_hooks`` inject attacks or defenses; ``schedule`` drops
    clients deterministically (see :class:`InProcessTransport`); ``model`` is the users'
    own (a module or a factory, see :mod:`securefl.own`) in place of ``[model]``.
    """
    data = data if data is not None else federate(config.data, seed=config.run.seed)
    ids = list(data.clients)
    privacy = None
    hooks: list[Any] = list(server_hooks)
    if config.privacy.mode != "none":
        from securefl.privacy import build_privacy

        privacy = build_privacy(config, run_dir=run_dir, client_ids=ids,
                                num_examples={c: len(d.train) for c, d in data.clients.items()})
        if privacy is not None:
            hooks.extend(privacy.server_hooks)

    local = {cid: local_trainer(config, data, cid, model=model) for cid in ids}
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
                                     root_data=root_data, model=model)
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


def root_trainer(config: Config, data: FederatedData, *, count: int,
                 model: OwnModel | None = None) -> LocalTrainer:
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
    net = build_model(config.model, data.shape, data.num_classes, seed=config.run.seed,
                      own=model)
    return LocalTrainer(net, root, root.subset(np.arange(0)), epochs=c.epochs,
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
    with torch_threads(config.simulation.torch_threads()):
        return _simulate(config, run_dir, on_round, build_options)


def _simulate(config: Config, run_dir: Path | None,
              on_round: Callable[[RoundRecord], None] | None,
              build_options: Mapping[str, Any]) -> RunResult:
    started = time.perf_counter()
    sim = build_simulation(config, run_dir=run_dir, **build_options)
    setup_seconds = time.perf_counter() - started
    if run_dir is not None:
        write_json(run_dir / "provenance.json", provenance(sim.config, sim.data, sim.model))
    rows: list[dict[str, Any]] = []

    def record(rec: RoundRecord) -> None:
        row = rec.to_json()
        rows.append(row if sim.privacy is None else sim.privacy.public_record(row))
        if run_dir is not None:
            append_jsonl(run_dir / "metrics.jsonl", rows)
        if on_round is not None:
            on_round(rec)

    history = sim.server.run(config.run.rounds, on_round=record)
    sim.transport.close()
    params = sim.parameters()
    if run_dir is not None:
        save_final_model(run_dir, config, sim.evaluator, params)
        if sim.privacy is not None and hasattr(sim.privacy, "finalize"):
            sim.privacy.finalize(run_dir)
        write_json(run_dir / "summary.json", summary(config, history, setup_seconds,
                                                      time.perf_counter() - started))
        plot_accuracy(history, run_dir / "accuracy.png", title=config.run.name)
    return RunResult(history, params, run_dir)


def save_final_model(run_dir: Path, config: Config, evaluator: TestSetEvaluator,
                     parameters: np.ndarray) -> Path:
    """``model.safetensors``: the final state dict, loadable with no code executed."""
    unflatten(evaluator.model, parameters, evaluator.layout)
    return save_model(run_dir / "model.safetensors",
                      {k: v.detach().numpy() for k, v in evaluator.model.state_dict().items()},
                      metadata={"format": "pt-state-dict", "model": config.model.name})

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
