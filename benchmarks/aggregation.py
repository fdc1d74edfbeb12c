"""Time every aggregation rule relative to the mean; Flower's robust rules side by side.

Prints one JSON document.  For each grid point ``(n, d)`` (``f = floor((n - 3) / 4)``, the
largest Bulyan allows) every rule runs on the same float32 ``(n, d)`` input; times are medians
over repeats.  Ratios are given against FedAvg (securefl's mean, float64 accumulation) and
against ``rows.mean(axis=0)`` (numpy's float32 mean, the cheapest possible pass).  When ``flwr``
is installed its ``aggregate_krum``, ``aggregate_median``, ``aggregate_trimmed_avg`` and
``aggregate_bulyan`` run on the same input; ``speedup`` is Flower's time over ours.

    python benchmarks/aggregation.py                       # n in {20, 50, 100}, d in {1e5, 1e6}
    python benchmarks/aggregation.py --n 50 --d 1000000    # one point
    python benchmarks/aggregation.py --flower-bulyan-max-d 1000000   # Flower's Bulyan at 1e6 too

Flower's Krum computes n^2 distances in a Python loop and its Bulyan repeats that n - 2f
times, so by default Flower's Bulyan runs only up to ``d = 1e5``; slow functions get fewer
repeats (each stops after ``--budget`` seconds once it has one sample).  Functions run
interleaved, round after round, so that load from other processes hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from securefl.aggregation import (
    NNM,
    Bulyan,
    CenteredClipping,
    FedAvg,
    FLTrust,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
)


def timed(functions: dict[str, Callable[[], Any]], *, repeats: int,
          budget: float) -> dict[str, float]:
    """Median wall time of each function over up to ``repeats`` interleaved rounds.

    Rounds alternate between the functions so that load from other processes hits all of
    them alike; a function that has spent ``budget`` seconds stops being repeated.
    """
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if samples[name] and sum(samples[name]) >= budget:
                continue
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def our_rules(n: int, f: int, rows: np.ndarray) -> dict[str, Callable[[], Any]]:
    beta = max(f, 1) / n
    reference = rows[: n - f].mean(axis=0)
    cc = CenteredClipping(tau=1.0, iterations=3)
    fltrust = FLTrust()
    return {
        "krum": lambda: Krum(num_byzantine=f)(rows),
        "multikrum": lambda: MultiKrum(num_byzantine=f)(rows),
        "median": lambda: Median()(rows),
        "trimmed_mean": lambda: TrimmedMean(beta=beta)(rows),
        "bulyan": lambda: Bulyan(num_byzantine=f)(rows),
        "geometric_median": lambda: GeometricMedian()(rows),
        "centered_clipping": lambda: cc(rows, state=reference),
        "norm_bound": lambda: NormBound(max_norm=1.0)(rows),
        "nnm_krum": lambda: NNM(num_byzantine=f, inner=Krum(num_byzantine=f))(rows),
        "fltrust": lambda: fltrust(rows, reference=reference),
    }


def flower_rules(n: int, f: int, rows: np.ndarray, *, bulyan: bool,
                 ) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Flower's functions by the name of our rule they compare with."""
    try:
        from flwr.server.strategy import aggregate as flower
    except ImportError:
        return {}
    beta = max(f, 1) / n

    def results() -> list[tuple[list[np.ndarray], int]]:
        return [([row], 1) for row in rows]

    table = {
        "krum": ("aggregate_krum",
                 lambda: flower.aggregate_krum(results(), num_malicious=f, to_keep=0)),
        "median": ("aggregate_median", lambda: flower.aggregate_median(results())),
        "trimmed_mean": ("aggregate_trimmed_avg",
                         lambda: flower.aggregate_trimmed_avg(results(), proportiontocut=beta)),
    }
    if bulyan:
        table["bulyan"] = ("aggregate_bulyan", lambda: flower.aggregate_bulyan(
            results(), num_malicious=f, aggregation_rule=flower.aggregate_krum, to_keep=0))
    return table


def grid_point(n: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    rows = rng.standard_normal((n, d), dtype=np.float32) * np.float32(1.0 / np.sqrt(d))
    f = (n - 3) // 4
    functions: dict[str, Callable[[], Any]] = {
        "fedavg": lambda: FedAvg()(rows),
        "numpy_mean": lambda: rows.mean(axis=0),
        **our_rules(n, f, rows),
    }
    flower_names: dict[str, str] = {}
    if not args.no_flower:
        table = flower_rules(n, f, rows, bulyan=d <= args.flower_bulyan_max_d)
        for name, (function_name, function) in table.items():
            functions[f"flower:{function_name}"] = function
            flower_names[function_name] = name
    seconds = timed(functions, repeats=args.repeats, budget=args.budget)
    fedavg, numpy_mean = seconds.pop("fedavg"), seconds.pop("numpy_mean")

    def entry(value: float) -> dict[str, float]:
        return {"seconds": value, "x_fedavg": value / fedavg, "x_numpy_mean": value / numpy_mean}

    ours = {name: entry(value) for name, value in seconds.items()
            if not name.startswith("flower:")}
    flower = {function_name: {**entry(seconds[f"flower:{function_name}"]), "ours": name,
                              "speedup": seconds[f"flower:{function_name}"]
                              / ours[name]["seconds"]}
              for function_name, name in flower_names.items()}
    return {"n": n, "d": d, "f": f, "fedavg_seconds": fedavg, "numpy_mean_seconds": numpy_mean,
            "rules": ours, "flower": flower}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds after which a function stops being repeated")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--flower-bulyan-max-d", type=int, default=100_000)
    args = parser.parse_args()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = None
    else:
        limits = threadpool_limits(limits=args.threads)
    try:
        import flwr
        flower_version = None if args.no_flower else flwr.__version__
    except ImportError:
        flower_version = None
    points = [grid_point(n, d, args) for d in args.d for n in args.n]
    print(json.dumps({
        "benchmark": "aggregation",
        "numpy": np.__version__,
        "flwr": flower_version,
        "blas_threads": args.threads if limits is not None else None,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "grid": points,
    }, indent=2))


if __name__ == "__main__":
    main()
