"""Distributed DP (Skellam under SecAgg+) against central DP-FedAvg: accuracy, upload, cost.

* ``accuracy``: the federation of ``examples/dp_fedavg.toml`` (100 clients, 20 per round,
  30 rounds, epsilon 8 at delta 1e-5), once with central DP-FedAvg (``plain`` protection, the
  server adds Gaussian noise) and once with ``examples/distributed_dp.toml`` (each site adds
  its Skellam share before SecAgg+, 16 bits per coordinate; ``--min-cohorts`` runs it again
  at other minimum cohorts).  The comparison is fair by construction: the same accounting
  rule (``sampling = "public"``: q = 1 per round taken part in, both calibrated for the
  0.999-quantile of Binomial(30, 0.2), 13 rounds, so no client runs out and all 30 rounds
  run), the same fixed ``clip_norm`` and epsilon, and both noises from the CSPRNG
  (``secure_mode`` for the central run, as deployed), so each of ``--repeats`` runs per seed
  is a fresh draw of the noise while data, model and sample follow the seed.  Reported per
  mechanism: final test accuracy of every run, the mean, its standard error, the mean over
  the last 5 rounds, the rounds that aggregated fewer than the cohort's 20 updates (with
  the fewest, and the dropped, declined and rejected updates: none, in a run that measures
  what it should) and the arm's wall time; the arms' runs are interleaved (for each seed
  and repeat, one run of each arm in turn, so that a drift of the shared machine falls on
  every arm alike); the paired difference (central - distributed, per seed) and its
  standard error; and ``noise``: the central ``z`` and the distributed one in the same units
  (std of the noise in the released sum over ``C``: at exactly ``min_cohort`` survivors less
  ``colluding_sites``, what the ledger charges, and with the whole cohort after the
  removal of the excess noise of its ``noise_levels``, what the model carries, both from the
  plan, and the latter measured on decoded sums), with their ratio to the central one.
* ``noise_price`` (``--noise-price-seeds``): the accuracy that the distributed sum's extra
  noise alone costs, measured with common random numbers: central DP-FedAvg at the central
  ``z`` and at the ``z`` the distributed sum carries with the whole cohort, with the
  server's seeded noise (``secure_mode = false``, a simulation-only control), so both runs
  of a seed draw the same standard normals, scaled by the two ``z`` (and share data, model,
  sample and training randomness); the paired differences (final accuracy, mean of the
  last 5 rounds), their mean and standard error.  No ledger budget: no site declines.
* ``upload``: bytes a site uploads per round (the masked words) over ``4 d`` float32 bytes,
  at ``d = --dimension`` and for the quickstart model.
* ``client_cost``: one site's rotation, rounding, noise and masking at ``d = --dimension``
  for a cohort of ``--cohort`` (masks: its self mask and one pairwise mask per SecAgg+
  neighbour, ``k`` from :func:`securefl.secagg.graph.auto_neighbours`), with one noise
  level at the cohort (``ms``: one excess Skellam vector more) and without levels
  (``ms_without_levels``); medians over ``--cost-repeats`` in ms of the process's CPU time
  (one core's work: the steps are single-threaded numpy and OpenSSL, so a shared machine's
  wall time, ``total_wall``, mostly measures the other processes).
* ``server_removal``: the server's extra CPU time to regenerate and subtract the excess
  components of ``--cohort`` sites at the example's model size.

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
import math
import statistics
import sys
import time
from typing import Any

import numpy as np
from distributed_dp_cost import EXAMPLES, client_cost, model_size, server_removal, upload

from securefl.config import Config, load_config
from securefl.engine.history import History
from securefl.engine.protection import Update
from securefl.privacy import build_privacy, distributed_settings
from securefl.privacy.calibration import PARTICIPATION_QUANTILE
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.privacy.rotation import padded_dimension
from securefl.simulation import run_simulation


def _configs() -> tuple[Config, Config]:
    """(central, distributed): the two examples at one accounting rule, clip and noise source."""
    distributed = load_config(EXAMPLES / "distributed_dp.toml").replace(run__threat_model=None)
    quantile = distributed.privacy.participation_quantile or PARTICIPATION_QUANTILE
    central = load_config(EXAMPLES / "dp_fedavg.toml").replace(
        privacy__sampling="public", privacy__adaptive_clipping=False,
        privacy__clip_norm=distributed.privacy.clip_norm, privacy__secure_mode=True,
        privacy__participation_quantile=quantile)
    return central, distributed.replace(privacy__participation_quantile=quantile)


def central_z(central: Config) -> float:
    """The noise multiplier central DP-FedAvg calibrates for ``central`` (NaN without DP)."""
    clients = [f"client_{i}" for i in range(central.data.num_clients)]
    setup = build_privacy(central, run_dir=None, client_ids=clients, num_examples={})
    return float(next(iter(setup.noise_multipliers.values()))) if setup else math.nan


def noise(central: Config, distributed: Config) -> dict[str, Any]:
    """Noise std of the released sum over ``C`` for both mechanisms (model units)."""
    z = central_z(central)
    size = model_size(distributed)
    settings = distributed_settings(distributed, distributed.data.num_clients)
    plan = settings.plan(size)
    unit = plan.scale * settings.clip_norm  # integer units per C
    charged = math.sqrt(plan.variance) / unit
    full = math.sqrt(plan.released_variance(settings.expected_cohort)) / unit
    # randomized rounding adds at most 1/4 variance per coordinate and site, unaccounted
    rounding = math.sqrt(settings.expected_cohort / 4) / unit
    measured = released_noise(settings, size)
    return {"calibrated_rounds": settings.steps, "central_z": z,
            "distributed_z_measured": measured, "ratio_measured": measured / z,
            "distributed_z_at_min_cohort": charged, "distributed_z_full_cohort": full,
            "distributed_rounding_std_bound": rounding, "min_cohort": settings.min_cohort,
            "colluding_sites": settings.colluding_sites, "noise_levels": list(settings.levels),
            "ratio_at_min_cohort": charged / z, "ratio_full_cohort": full / z,
            "skellam_scale": plan.scale, "skellam_variance": plan.variance, "dimension": size}


def released_noise(settings: DistributedSettings, dimension: int, rounds: int = 10) -> float:
    """The std over ``C`` of what one round's decoded sum holds beyond the exact sum of the
    clipped updates: ``expected_cohort`` sites encode (clip, rotate, round, add their CSPRNG
    share, wrap; the masks cancel in the sum), the words are summed in ``Z_{2^b}``, every
    site's excess seeds of the levels ``<= expected_cohort`` are removed and the sum is
    decoded; pooled over ``rounds`` rounds of ``dimension`` coordinates."""
    encoding = SkellamEncoding(settings)
    rng = np.random.default_rng(0)  # the updates only; noise and rounding from the CSPRNG
    errors = []
    for _ in range(rounds):
        seed = os.urandom(32)
        updates = rng.normal(0, 1, (settings.expected_cohort, dimension))
        updates *= settings.clip_norm / np.linalg.norm(updates, axis=1, keepdims=True)
        total = np.zeros(padded_dimension(dimension), dtype=np.int64)
        revealed = encoding.removable(settings.expected_cohort)
        removed = []
        for row in updates:
            words, seeds = encoding.encode(Update(row.astype(np.float32), 1.0), seed=seed)
            total += words
            removed.append(seeds[:revealed])
        decoded, _ = encoding.decode(total & ((1 << settings.bits) - 1), seed=seed,
                                     survivors=settings.expected_cohort, dimension=dimension,
                                     removed=removed)
        errors.append(decoded - updates.astype(np.float32).sum(axis=0))
    return float(np.std(np.concatenate(errors)) / settings.clip_norm)


class _Arm:
    """One arm's runs: final accuracies by seed, the mean of the last 5 rounds, and how
    many updates each round aggregated (a round short of the cohort, a dropout, a decline
    or a rejection would change what the arm measures)."""

    def __init__(self, cohort: int) -> None:
        self.cohort = cohort
        self.finals: dict[int, list[float]] = {}
        self.last5: list[float] = []
        self.aborted = self.rounds = self.short = 0
        self.fewest = cohort
        self.dropped = self.declined = self.rejected = 0
        self.seconds = 0.0

    def add(self, seed: int, history: History, seconds: float) -> None:
        self.finals.setdefault(seed, []).append(float(history.rounds[-1].accuracy))
        self.last5.append(statistics.fmean(float(r.accuracy) for r in history.rounds[-5:]))
        self.seconds += seconds
        for record in history.rounds:
            self.rounds += 1
            self.aborted += record.aborted is not None
            self.dropped += len(record.dropped)
            self.declined += len(record.declined)
            self.rejected += len(record.rejected)
            if record.aborted is None:
                self.short += len(record.clients) < self.cohort
                self.fewest = min(self.fewest, len(record.clients))

    def summary(self) -> dict[str, Any]:
        every = [a for values in self.finals.values() for a in values]
        return {"final_accuracy": {str(s): v for s, v in self.finals.items()},
                "mean": statistics.fmean(every), "stderr": _stderr(every),
                "mean_last5": statistics.fmean(self.last5), "stderr_last5": _stderr(self.last5),
                "runs": len(every), "rounds_run": self.rounds, "aborted_rounds": self.aborted,
                "rounds_short_of_the_cohort": self.short, "fewest_updates_in_a_round":
                self.fewest, "dropped": self.dropped, "declined": self.declined,
                "rejected": self.rejected, "seconds": self.seconds}


def _runs(arms: dict[str, Config], seeds: list[int], repeats: int) -> dict[str, dict[str, Any]]:
    """Every arm ``repeats`` times per seed, interleaved: for each seed and repeat, one run
    of each arm in turn, so that whatever drifts over the benchmark's hour (the machine's
    load, its other jobs) falls on all arms alike instead of on the arm that runs last."""
    results = {name: _Arm(config.server.per_round(config.data.num_clients))
               for name, config in arms.items()}
    for seed in seeds:
        for _ in range(repeats):
            for name, config in arms.items():
                started = time.perf_counter()
                history = run_simulation(config.replace(run__seed=seed)).history
                results[name].add(seed, history, time.perf_counter() - started)
                # one line a run on stderr: a run stopped early still leaves its results
                print(json.dumps({"arm": name, "seed": seed,
                                  "final_accuracy": history.rounds[-1].accuracy,
                                  "seconds": round(time.perf_counter() - started, 1)}),
                      file=sys.stderr, flush=True)
    return {name: arm.summary() for name, arm in results.items()}


def _stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def accuracy(seeds: list[int], repeats: int, rounds: int | None, min_cohorts: list[int],
             matched: bool) -> dict[str, Any]:
    """The arms: central, distributed at each minimum cohort, and with ``matched`` a control
    (not a comparison at one epsilon): central DP-FedAvg at the noise multiplier the
    distributed sum carries with the whole cohort, which tells the price of that extra noise
    from the rest of the mechanism (rotation, rounding, wrap-around).  The arms' runs are
    interleaved (:func:`_runs`)."""
    central, distributed = _configs()
    if rounds is not None:
        central, distributed = (c.replace(run__rounds=rounds) for c in (central, distributed))
    arms: dict[str, Config] = {"central_dp_fedavg": central}
    noises: dict[str, dict[str, Any]] = {}
    controls: dict[str, tuple[str, float]] = {}
    for min_cohort in min_cohorts or [int(distributed.privacy.min_cohort or 0)]:
        # the example's noise levels that lie above this minimum cohort
        levels = tuple(level for level in distributed.privacy.noise_levels or ()
                       if level > min_cohort)
        config = distributed.replace(privacy__min_cohort=min_cohort, privacy__noise_levels=levels)
        name = f"distributed_skellam_min_cohort_{min_cohort}"
        arms[name], noises[name] = config, noise(central, config)
        if matched:
            z = noises[name]["distributed_z_full_cohort"]
            control = f"central_dp_fedavg_at_the_noise_of_min_cohort_{min_cohort}"
            arms[control] = central.replace(privacy__target_epsilon=None,
                                            privacy__noise_multiplier=z,
                                            privacy__participation_quantile=None)
            controls[control] = (name, z)
    out = _runs(arms, seeds, repeats)
    for name, measured in noises.items():
        out[name]["noise"] = measured
        out[name].update(_paired(out["central_dp_fedavg"], out[name]))
    for control, (name, z) in controls.items():
        out[control]["noise_multiplier"] = z
        out[control].update(_paired(out[control], out[name]))
    return out


def noise_price(seeds: list[int], rounds: int | None) -> dict[str, Any]:
    """Central at ``z`` and at ``z'`` (the distributed sum's, whole cohort): see the module
    docstring; positive differences: accuracy lost to the extra noise."""
    central, distributed = _configs()
    if rounds is not None:
        central, distributed = (c.replace(run__rounds=rounds) for c in (central, distributed))
    low = noise(central, distributed)
    z, z_high = low["central_z"], low["distributed_z_full_cohort"]
    base = central.replace(privacy__secure_mode=False, privacy__target_epsilon=None,
                           privacy__participation_quantile=None)
    finals: dict[float, list[float]] = {z: [], z_high: []}
    last5: dict[float, list[float]] = {z: [], z_high: []}
    for seed in seeds:
        for multiplier in (z, z_high):
            rounds = run_simulation(base.replace(run__seed=seed,
                                                 privacy__noise_multiplier=multiplier)
                                    ).history.rounds
            finals[multiplier].append(float(rounds[-1].accuracy))
            last5[multiplier].append(statistics.fmean(float(r.accuracy) for r in rounds[-5:]))
    final = [100 * (a - b) for a, b in zip(finals[z], finals[z_high], strict=True)]
    late = [100 * (a - b) for a, b in zip(last5[z], last5[z_high], strict=True)]
    return {"seeds": len(seeds), "z": z, "z_distributed": z_high, "ratio": z_high / z,
            "mean_accuracy": {"z": statistics.fmean(finals[z]),
                              "z_distributed": statistics.fmean(finals[z_high])},
            "paired_difference_pp": statistics.fmean(final),
            "paired_difference_stderr_pp": _stderr(final),
            "paired_difference_last5_pp": statistics.fmean(late),
            "paired_difference_last5_stderr_pp": _stderr(late)}


def _paired(central: dict[str, Any], distributed: dict[str, Any]) -> dict[str, Any]:
    """Central minus distributed, in percentage points: the difference of the means, its
    unpaired standard error, and per seed (pairs share data, model and sample) its mean and
    standard error over the seeds."""
    per_seed = [100 * (statistics.fmean(central["final_accuracy"][s])
                       - statistics.fmean(distributed["final_accuracy"][s]))
                for s in central["final_accuracy"]]
    return {"difference_pp": 100 * (central["mean"] - distributed["mean"]),
            "difference_stderr_pp": 100 * math.hypot(central["stderr"], distributed["stderr"]),
            "paired_difference_per_seed_pp": per_seed,
            "paired_difference_stderr_pp": _stderr(per_seed),
            "difference_last5_pp": 100 * (central["mean_last5"] - distributed["mean_last5"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=None, help="override the 30 rounds")
    parser.add_argument("--dimension", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1,
                        help="accuracy runs per seed (fresh CSPRNG noise each)")
    parser.add_argument("--min-cohorts", default="",
                        help="distributed runs at these min_cohort values (default: the "
                             "example's)")
    parser.add_argument("--cost-repeats", type=int, default=5)
    parser.add_argument("--matched-central", action="store_true",
                        help="also run central DP-FedAvg at the distributed sum's noise")
    parser.add_argument("--noise-price-seeds", type=int, default=0,
                        help="seeds 0..N-1 of the common-random-numbers noise price")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    report: dict[str, Any] = {
        "upload": upload(args.dimension, args.bits),
        "client_cost": client_cost(args.dimension, args.bits, args.cohort, args.cost_repeats),
        "server_removal": server_removal(args.cohort, args.bits, args.cost_repeats)}
    if seeds:
        report["accuracy"] = accuracy(seeds, args.repeats, args.rounds,
                                      [int(m) for m in args.min_cohorts.split(",") if m],
                                      args.matched_central)
    if args.noise_price_seeds:
        report["noise_price"] = noise_price(list(range(args.noise_price_seeds)), args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
