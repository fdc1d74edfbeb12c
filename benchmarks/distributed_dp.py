"""Distributed DP (Skellam under SecAgg+) against central DP-FedAvg: accuracy, upload, cost.

* ``accuracy``: the federation of ``examples/dp_fedavg.toml`` (100 clients, 20 per round,
  30 rounds, epsilon 8 at delta 1e-5), once with central DP-FedAvg (``plain`` protection, the
  server adds Gaussian noise) and once with ``examples/distributed_dp.toml`` (each site adds
  its Skellam share before SecAgg+, 16 bits per coordinate).  Both at the same accounting
  rule (``sampling = "public"``: q = 1 per round taken part in, calibrated for the expected
  ceil(30 * 20 / 100) = 6 rounds), the same fixed ``clip_norm`` and epsilon; final central test
  accuracy for each seed, and the means.
* ``upload``: bytes a site uploads per round (the masked words) over ``4 d`` float32 bytes,
  at ``d = --dimension`` and for the quickstart model.
* ``client_cost``: one site's rotation, rounding, noise and masking at ``d = --dimension``
  for a cohort of ``--cohort`` (masks: its self mask and one pairwise mask per SecAgg+
  neighbour, ``k`` from :func:`securefl.secagg.graph.auto_neighbours`); medians in ms of
  the process's CPU time (one core's work: the steps are single-threaded numpy and OpenSSL,
  so a shared machine's wall time, ``total_wall``, mostly measures the other processes).

Prints one JSON document.  ``--seeds ""`` skips the accuracy runs.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# one BLAS thread: the per-site cost is one core's work (spinning BLAS threads on a shared
# machine would add their busy-wait to the process's CPU time)
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import load_config
from securefl.models import build_model
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.privacy.rotation import rotate
from securefl.secagg.encoding import reduce, word_dtype
from securefl.secagg.graph import auto_neighbours, degree
from securefl.secagg.prg import add_masks
from securefl.simulation import run_simulation
from securefl.vector import Layout

EXAMPLES = Path(__file__).parents[1] / "examples"


def accuracy(seeds: list[int], rounds: int | None) -> dict[str, Any]:
    distributed = load_config(EXAMPLES / "distributed_dp.toml").replace(run__threat_model=None)
    central = load_config(EXAMPLES / "dp_fedavg.toml").replace(
        privacy__sampling="public", privacy__adaptive_clipping=False,
        privacy__clip_norm=distributed.privacy.clip_norm)
    out: dict[str, Any] = {}
    for name, config in (("central_dp_fedavg", central), ("distributed_skellam", distributed)):
        finals, aborted = [], []
        for seed in seeds:
            run = config.replace(run__seed=seed)
            if rounds is not None:
                run = run.replace(run__rounds=rounds)
            history = run_simulation(run).history
            finals.append(float(history.rounds[-1].accuracy))
            aborted.append(sum(1 for r in history.rounds if r.aborted))
        out[name] = {"final_accuracy": finals, "mean": statistics.fmean(finals),
                     "aborted_rounds": aborted}
    out["difference_pp"] = 100 * (out["central_dp_fedavg"]["mean"]
                                  - out["distributed_skellam"]["mean"])
    return out


def _settings(bits: int, cohort: int) -> DistributedSettings:
    return DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0,
                               bits=bits, expected_cohort=cohort,
                               min_cohort=max(1, cohort * 4 // 5))


def upload(dimension: int, bits: int) -> dict[str, Any]:
    quickstart = load_config(EXAMPLES / "quickstart.toml")
    from securefl.data import federate

    data = federate(quickstart.data, seed=0)
    d_quick = Layout.of(build_model(quickstart.model, data.shape, data.num_classes,
                                    seed=0)).size
    encoding = SkellamEncoding(_settings(bits, 20))
    itemsize = word_dtype(bits).itemsize

    def ratio(d: int) -> float:
        return encoding.words(d) * itemsize / (4 * d)

    return {"bits": bits, "dimension": dimension, "ratio_vs_float32": ratio(dimension),
            "quickstart_dimension": d_quick, "quickstart_ratio_vs_float32": ratio(d_quick)}


def client_cost(dimension: int, bits: int, cohort: int, repeats: int) -> dict[str, Any]:
    settings = _settings(bits, cohort)
    encoding = SkellamEncoding(settings)
    plan = settings.plan(dimension)
    k = degree(cohort, neighbours=auto_neighbours(cohort))
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1, dimension).astype(np.float32)
    delta *= np.float32(0.9 / np.linalg.norm(delta))
    seed = os.urandom(32)
    keys = [(os.urandom(16), 1 if i % 2 else -1) for i in range(k + 1)]
    parts: dict[str, list[float]] = {name: [] for name in ("rotate", "round", "noise", "mask",
                                                            "total", "total_wall")}
    for _ in range(repeats):
        wall, start = time.perf_counter(), time.process_time()
        rotated = rotate(delta.astype(np.float64), seed=seed) * plan.scale
        rotated_at = time.process_time()
        rounded = encoding.round_to_integers(rotated, plan.l2)
        rounded_at = time.process_time()
        noisy = rounded + encoding.noise_share(dimension)
        words = (noisy & ((1 << bits) - 1)).astype(word_dtype(bits))
        noised_at = time.process_time()
        add_masks(words, keys)
        reduce(words, bits)
        end = time.process_time()
        parts["total_wall"].append(time.perf_counter() - wall)
        for name, value in (("rotate", rotated_at - start), ("round", rounded_at - rotated_at),
                            ("noise", noised_at - rounded_at), ("mask", end - noised_at),
                            ("total", end - start)):
            parts[name].append(value)
    ms = {name: 1000 * statistics.median(values) for name, values in parts.items()}
    return {"dimension": dimension, "cohort": cohort, "neighbours": k, "bits": bits,
            "scale": plan.scale, "variance": plan.variance, "ms": ms,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=None, help="override the 30 rounds")
    parser.add_argument("--dimension", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    report: dict[str, Any] = {
        "upload": upload(args.dimension, args.bits),
        "client_cost": client_cost(args.dimension, args.bits, args.cohort, args.repeats)}
    if seeds:
        report["accuracy"] = accuracy(seeds, args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
