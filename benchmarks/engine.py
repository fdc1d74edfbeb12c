"""Engine overhead per client per round, with no-op clients.

Each client answers FitIns with a fixed random d-vector (made once, outside the timing), so
what is timed is the engine: sampling, message construction, the transport, the plain
protection's validation and stacking, FedAvg, the server step and bookkeeping.  With
``--wire`` every message also goes through the codec.

When ``flwr`` is installed, the same workload runs through Flower's server-side path in
the same process: each client's result is serialised with ``ndarrays_to_parameters`` and
aggregated with ``FedAvg.aggregate_fit`` (Flower's simulation needs Ray, which is not a
dependency; this measures Flower's own per-client server work without any transport).

    python benchmarks/engine.py [--repeats 5] [--wire]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from securefl.aggregation import FedAvg
from securefl.config import load_config
from securefl.engine.messages import FitRes, PlainUpdate
from securefl.engine.optim import ServerOptimizer
from securefl.engine.protection import Plain
from securefl.engine.server import Server
from securefl.engine.simulation import InProcessTransport


class NoOpClient:
    def __init__(self, client_id: str, vector: np.ndarray) -> None:
        self.client_id = client_id
        self.reply = FitRes(payload=PlainUpdate(update=vector, weight=1.0), metrics={})

    def handle(self, request, *, round):
        return self.reply


def securefl_round_seconds(n: int, d: int, repeats: int, wire: bool) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(d, dtype=np.float32) * 1e-3 for _ in range(n)]
    started = time.perf_counter()
    clients = {f"c{i}": NoOpClient(f"c{i}", vectors[i]) for i in range(n)}
    server = Server(InProcessTransport(clients, wire=wire), Plain(), FedAvg(), ServerOptimizer(),
                    parameters=np.zeros(d, np.float32), seed=0)
    times = []
    for rnd in range(1, repeats + 2):
        t0 = time.perf_counter()
        if rnd == 1:
            startup = t0 - started
        server.run_round(rnd)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), startup


def flower_round_seconds(n: int, d: int, repeats: int) -> float | None:
    try:
        import logging

        from flwr.common import Code, Status, ndarrays_to_parameters
        from flwr.common import FitRes as FlFitRes
        from flwr.server.strategy import FedAvg as FlFedAvg
    except ImportError:
        return None
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(d, dtype=np.float32) * 1e-3 for _ in range(n)]
    strategy = FlFedAvg()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        results = [(None, FlFitRes(Status(Code.OK, ""), ndarrays_to_parameters([v]), 1, {}))
                   for v in vectors]
        strategy.aggregate_fit(1, results, [])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def quickstart_startup() -> float:
    from securefl.simulation import build_simulation

    config = load_config("examples/quickstart.toml")
    t0 = time.perf_counter()
    build_simulation(config)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wire", action="store_true", help="run messages through the codec")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    rows = []
    for d in args.dims:
        for n in args.clients:
            seconds, startup = securefl_round_seconds(n, d, args.repeats, args.wire)
            row = {"clients": n, "dimension": d, "wire": args.wire,
                   "round_seconds_median": round(seconds, 6),
                   "ms_per_client_round": round(1e3 * seconds / n, 4),
                   "startup_seconds": round(startup, 4)}
            flower = flower_round_seconds(n, d, args.repeats)
            if flower is not None:
                row["flower_ms_per_client_round"] = round(1e3 * flower / n, 4)
                row["flower_over_securefl"] = round(flower / seconds, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout: one doc
    print(json.dumps({"quickstart_startup_seconds": round(quickstart_startup(), 4),
                      "results": rows}))


if __name__ == "__main__":
    main()
