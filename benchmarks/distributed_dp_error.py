"""Where distributed DP's released mean differs from central DP-FedAvg's: exact error budgets.

Accuracy runs are noisy (a run's final accuracy spreads by about 5 pp with the noise draw);
the released aggregates are not.  This diagnostic compares the two releases on the SAME
client updates, component by component, and the two training paths beyond the release.

* ``paths``: one run of each arm of ``benchmarks/distributed_dp.py`` (central DP-FedAvg at a
  fixed clip, distributed Skellam under SecAgg+), all its rounds (``--rounds`` overrides
  them, and with them the calibration of both arms: the noise follows the rounds a site
  takes part in), every clipped
  update the trainers hand over and every released sum recorded: whether both arms sample
  the same clients, train the same first-round updates from the same initial model (the
  maximal coordinate difference of the round-1 clipped updates: later rounds start from
  models that already differ by their noise), their norms (the clip that took effect), the
  denominator and the config sections that differ.  On that real path (SecAgg+ masks,
  wire codec, excess removal) the error of each released sum against the exact sum of the
  clipped updates of its survivors: std per coordinate in units of ``C`` (the effective
  ``z``) against the plan, and its bias.
* ``release``: the recorded updates of round ``--release-round`` of the distributed run
  (round 1: the same updates in both arms; a late round: norms near ``C``) released
  ``--repeats`` times by both mechanisms (central: ``sum + N(0, (zC)^2)``; distributed:
  clip, rotate, scale, conditional rounding, noise shares, wrap into ``Z_{2^b}``, the
  plaintext equivalent of the SecAgg+ sum, excess removal, unrotate, unscale), split into
  the rounding part and the noise part, checked to add up exactly to the decoded error (no
  wrap), with per component: std per coordinate over ``C`` and the plan's prediction, the
  excess kurtosis (0 for a Gaussian), the bias (norm of the mean error vector against the
  norm pure noise would leave, and its projection on the true sum), the gain of the
  rounded sum along the true sum (1: no shrinkage, as from a clip at a smaller norm), the
  rejection rate of conditional rounding, the wrap rate, the second clip's smallest factor
  (the trainer's float32 clip leaves norms up to ``C (1 + 3e-8)``; the encoding clips those
  again in float64, to the same ``C``).  The errors are against the sum of the updates as
  the trainers handed them over, so the second clip's effect is in the decoded error.

Prints one JSON document.  Every number divides by ``C`` (the sum's units, before the
division by ``m``, which both arms make by the same fixed ``m``: ``paths.denominators``).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import contextlib
import json
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
# the two arms and the central z, exactly as the accuracy benchmark has them
from distributed_dp import _configs, central_z

from securefl.config import Config
from securefl.privacy import distributed_settings
from securefl.privacy.distributed import DistributedMean, SkellamEncoding
from securefl.privacy.dp_fedavg import UserLevelNoise, UserLevelTrainer
from securefl.privacy.randomness import SecureRandom
from securefl.privacy.rotation import rotate, unrotate
from securefl.simulation import run_simulation


class _Recorder:
    """Every clipped update a trainer returns and every released sum, by round."""

    def __init__(self) -> None:
        self.updates: dict[int, dict[str, np.ndarray]] = {}
        self.released: dict[int, tuple[tuple[str, ...], np.ndarray, float]] = {}
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        fit, central, distributed = (UserLevelTrainer.fit, UserLevelNoise.transform_combined,
                                     DistributedMean.transform_combined)

        def record_fit(trainer: Any, parameters: np.ndarray, *, round: int) -> Any:
            update, metrics = fit(trainer, parameters, round=round)
            with self.lock:
                self.updates.setdefault(round, {})[trainer.client_id] = update.delta.copy()
            return update, metrics

        def wrap(original: Any) -> Any:
            def record(hook: Any, combined: Any, *, round: int, rng: Any) -> Any:
                out = original(hook, combined, round=round, rng=rng)
                self.released[round] = (tuple(out.client_ids), np.array(out.total, np.float64),
                                        float(out.total_weight))
                return out
            return record

        UserLevelTrainer.fit = record_fit  # type: ignore[method-assign]
        UserLevelNoise.transform_combined = wrap(central)  # type: ignore[method-assign]
        DistributedMean.transform_combined = wrap(distributed)  # type: ignore[method-assign]
        try:
            yield
        finally:
            UserLevelTrainer.fit = fit  # type: ignore[method-assign]
            UserLevelNoise.transform_combined = central  # type: ignore[method-assign]
            DistributedMean.transform_combined = distributed  # type: ignore[method-assign]

    def exact(self, round: int) -> np.ndarray:
        ids, _, _ = self.released[round]
        return np.sum([self.updates[round][c].astype(np.float64) for c in ids], axis=0)


def _record(config: Config) -> tuple[_Recorder, Any]:
    recorder = _Recorder()
    with recorder.patched():
        history = run_simulation(config).history
    return recorder, history


def _bias(errors: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``errors``: repeats x d.  The norm of the mean error vector over the norm that
    independent noise of the measured std would leave (about 1 without bias), and the mean
    error's projection on the unit vector of the true sum, in units of C and in standard
    errors."""
    repeats, dimension = errors.shape
    mean = errors.mean(axis=0)
    std = float(errors.std())
    unit = truth / np.linalg.norm(truth)
    projection = float(mean @ unit)
    return {"mean_error_norm_over_noise": float(np.linalg.norm(mean))
            / (std * math.sqrt(dimension / repeats)),
            "projection_on_true_sum": projection,
            "projection_in_stderr": projection / (std / math.sqrt(repeats))}


def _paths(central: Config, distributed: Config) -> tuple[dict[str, Any], Any]:
    central_run, central_history = _record(central)
    dist_run, dist_history = _record(distributed)
    first_c, first_d = central_run.updates[1], dist_run.updates[1]
    same = sorted(first_c) == sorted(first_d)
    difference = max(float(np.abs(first_c[c] - first_d[c]).max()) for c in first_c) if same \
        else math.nan
    clip = distributed.privacy.clip_norm
    plan = distributed_settings(distributed, distributed.data.num_clients).plan(
        next(iter(first_d.values())).size)
    unit = plan.scale * clip

    def errors(run: _Recorder) -> dict[str, Any]:
        per_round = [run.released[r][1] - run.exact(r) for r in sorted(run.released)]
        norms = [float(np.linalg.norm(u)) / clip for r in run.updates
                 for u in run.updates[r].values()]
        return {"error_std_over_C": float(np.std(np.concatenate(per_round))) / clip,
                "error_std_over_C_per_round": [float(np.std(e)) / clip for e in per_round],
                "error_mean_per_coordinate_over_C": float(np.mean(np.concatenate(per_round)))
                / clip,
                "update_norm_over_C": {"min": min(norms), "median": float(np.median(norms)),
                                       "max": max(norms),
                                       "clipped_fraction": float(np.mean(
                                           [n >= 1 - 1e-6 for n in norms]))},
                "denominators": sorted({w for _, _, w in run.released.values()}),
                "survivors": [len(run.released[r][0]) for r in sorted(run.released)]}

    sections = ("run", "data", "model", "client", "server", "aggregation", "simulation",
                "privacy", "protection")
    result = {
        "rounds": len(dist_history.rounds),
        "final_accuracy": {"central": central_history.rounds[-1].accuracy,
                           "distributed": dist_history.rounds[-1].accuracy},
        "same_sample_every_round": [r.sampled for r in central_history.rounds]
        == [r.sampled for r in dist_history.rounds],
        "same_round1_clients": same,
        "round1_update_max_abs_difference": difference,
        "config_sections_that_differ": [s for s in sections
                                        if getattr(central, s) != getattr(distributed, s)],
        "simulation_wire": {"central": central.simulation.wire,
                            "distributed": distributed.simulation.wire},
        "clip_norm": {"central": central.privacy.clip_norm, "distributed": clip,
                      "central_adaptive": central.privacy.adaptive_clipping},
        "central": errors(central_run), "distributed": errors(dist_run),
        "planned_z": {"central": central_z(central),
                      "distributed_full_cohort": math.sqrt(
                          plan.released_variance(plan.shares + plan.colluding_sites
                                                 if not plan.levels else plan.levels[-1]))
                      / unit,
                      "distributed_charged": math.sqrt(plan.variance) / unit}}
    return result, dist_run


def _release(central: Config, distributed: Config, updates: dict[str, np.ndarray],
             repeats: int) -> dict[str, Any]:
    settings = distributed_settings(distributed, distributed.data.num_clients)
    encoding = SkellamEncoding(settings)
    rows = np.stack([updates[c].astype(np.float64) for c in sorted(updates)])
    cohort, dimension = rows.shape
    plan = settings.plan(dimension)
    clip, bits = settings.clip_norm, settings.bits
    unit = plan.scale * clip
    truth = rows.sum(axis=0)
    z = central_z(central)
    source = SecureRandom()
    half = 1 << (bits - 1)
    reveal = encoding.removable(cohort)
    central_err, total_err, rounding_err, noise_err = [], [], [], []
    gains, rejected, wraps, second_clips, mismatch = [], 0, 0, 1.0, 0.0
    tries = 0
    for _ in range(repeats):
        central_err.append(source.gaussian(dimension, z * clip).numpy())
        seed = os.urandom(32)
        ints = np.zeros(plan.padded, np.int64)
        scaled = np.zeros(plan.padded, np.float64)
        noise = np.zeros(plan.padded, np.int64)
        removed = []
        for row in rows:
            second_clips = min(second_clips, min(1.0, clip / float(np.linalg.norm(row))))
            rounded = encoding.integers(row.astype(np.float32), seed=seed)
            clipped = row * min(1.0, clip / float(np.linalg.norm(row)))
            y = rotate(clipped, seed=seed) * plan.scale
            # the rejection rate: fresh roundings of y against the bound
            for _ in range(4):
                candidate = np.floor(y) + (source.uniform(y.size) < y - np.floor(y))
                rejected += float(candidate @ candidate) > plan.l2 ** 2
                tries += 1
            share, seeds = encoding.noise_share(dimension)
            ints += rounded
            scaled += y
            noise += share
            removed.append(seeds[:reveal])
        kept = noise - sum((encoding.excess(dimension, level=j, seed=s[j])
                            for s in removed for j in range(reveal)), np.zeros_like(noise))
        unwrapped = ints + kept
        wraps += int(((unwrapped < -half) | (unwrapped >= half)).sum())
        total = (ints + noise) & ((1 << bits) - 1)
        decoded, _ = encoding.decode(total, seed=seed, survivors=cohort, dimension=dimension,
                                     removed=removed)
        rounding = unrotate((ints - scaled) / plan.scale, seed=seed, dimension=dimension)
        noisy = unrotate(kept / plan.scale, seed=seed, dimension=dimension)
        signal = unrotate(ints / plan.scale, seed=seed, dimension=dimension)
        gains.append(float(signal @ truth) / float(truth @ truth))
        total_err.append(decoded - truth)
        rounding_err.append(rounding)
        noise_err.append(noisy)
        mismatch = max(mismatch, float(np.abs(decoded - (truth + rounding + noisy)).max()))

    def component(errors: list[np.ndarray], predicted: float) -> dict[str, Any]:
        stacked = np.stack(errors) / clip
        centred = stacked - stacked.mean()
        kurtosis = float((centred ** 4).mean() / (centred ** 2).mean() ** 2) - 3
        return {"std_over_C": float(stacked.std()), "predicted_std_over_C": predicted,
                "excess_kurtosis": kurtosis, **_bias(stacked, truth)}

    full = math.sqrt(plan.released_variance(cohort)) / unit
    return {
        "repeats": repeats, "cohort": cohort,
        "update_norm_over_C": sorted(float(np.linalg.norm(r)) / clip for r in rows),
        "dimension": dimension, "padded": plan.padded,
        "true_sum_norm_over_C": float(np.linalg.norm(truth)) / clip,
        "scale": plan.scale, "l2_bound_over_sC": plan.l2 / unit,
        "central": component(central_err, z),
        "distributed_total": component(total_err, math.hypot(full, math.sqrt(cohort / 6) / unit)),
        "distributed_noise": component(noise_err, full),
        "distributed_rounding": {**component(rounding_err, math.sqrt(cohort / 6) / unit),
                                 "bound_std_over_C": math.sqrt(cohort / 4) / unit},
        "z_ratio_distributed_over_central": float(np.stack(total_err).std())
        / float(np.stack(central_err).std()),
        "rounded_sum_gain_along_true_sum": {"mean": float(np.mean(gains)),
                                            "stderr": float(np.std(gains) / math.sqrt(repeats))},
        "conditional_rounding_rejection_rate": rejected / tries,
        "wrapped_coordinates_rate": wraps / (repeats * plan.padded),
        # the encoding clips the float32 update again in float64: at the same norm C
        "second_clip_smallest_factor": second_clips,
        "decode_minus_components_max_abs": mismatch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=100, help="releases of the round")
    parser.add_argument("--release-round", type=int, default=1,
                        help="whose recorded updates are released")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="override the 30 rounds")
    args = parser.parse_args()
    central, distributed = (c.replace(run__seed=args.seed) for c in _configs())
    if args.rounds is not None:
        central, distributed = (c.replace(run__rounds=args.rounds)
                                for c in (central, distributed))
    paths, recorded = _paths(central, distributed)
    report = {"paths": paths,
              "release": _release(central, distributed,
                                  recorded.updates[args.release_round], args.repeats)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
