"""Distributed DP's upload and per-site cost (``benchmarks/distributed_dp.py`` prints them):
the bytes a site sends against float32, one site's rotation, rounding, noise and masking at
``d`` coordinates, and the server's extra work to remove the excess noise."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import Config, load_config
from securefl.models import build_model
from securefl.privacy.distributed import DistributedSettings, SkellamEncoding
from securefl.secagg.encoding import reduce, word_dtype
from securefl.secagg.graph import auto_neighbours, degree
from securefl.secagg.prg import add_masks
from securefl.vector import Layout

EXAMPLES = Path(__file__).parents[1] / "examples"


def _settings(bits: int, cohort: int, levels: tuple[int, ...] = ()) -> DistributedSettings:
    return DistributedSettings(target_epsilon=8.0, delta=1e-5, steps=6, clip_norm=1.0,
                               bits=bits, expected_cohort=cohort,
                               min_cohort=max(1, cohort * 4 // 5), colluding_sites=1,
                               levels=levels)


def model_size(config: Config) -> int:
    """The number of coordinates of ``config``'s model (the update a site sends)."""
    from securefl.data import federate

    data = federate(config.data, seed=0)
    return Layout.of(build_model(config.model, data.shape, data.num_classes, seed=0)).size


def upload(dimension: int, bits: int) -> dict[str, Any]:
    quickstart = load_config(EXAMPLES / "quickstart.toml")
    d_quick = model_size(quickstart)
    encoding = SkellamEncoding(_settings(bits, 20))
    itemsize = word_dtype(bits).itemsize

    def ratio(d: int) -> float:
        return encoding.words(d) * itemsize / (4 * d)

    return {"bits": bits, "dimension": dimension, "ratio_vs_float32": ratio(dimension),
            "quickstart_dimension": d_quick, "quickstart_ratio_vs_float32": ratio(d_quick)}


def client_cost(dimension: int, bits: int, cohort: int, repeats: int) -> dict[str, Any]:
    """One site's steps with the default noise level (``[cohort]``: one excess component)
    and without levels (``ms_without_levels``)."""
    settings = _settings(bits, cohort, (cohort,))
    plan = settings.plan(dimension)
    k = degree(cohort, neighbours=auto_neighbours(cohort))
    return {"dimension": dimension, "cohort": cohort, "neighbours": k, "bits": bits,
            "scale": plan.scale, "variance": plan.variance, "noise_levels": list(settings.levels),
            "ms": _site_cost(settings, dimension, k, repeats),
            "ms_without_levels": _site_cost(_settings(bits, cohort), dimension, k, repeats),
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def _site_cost(settings: DistributedSettings, dimension: int, neighbours: int,
               repeats: int) -> dict[str, float]:
    encoding = SkellamEncoding(settings)
    plan = settings.plan(dimension)
    bits = settings.bits
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1, dimension).astype(np.float32)
    delta *= np.float32(0.9 / np.linalg.norm(delta))
    seed = os.urandom(32)
    keys = [(os.urandom(16), 1 if i % 2 else -1) for i in range(neighbours + 1)]
    parts: dict[str, list[float]] = {name: [] for name in ("rotate", "round", "noise", "mask",
                                                            "total", "total_wall")}
    for _ in range(repeats):
        wall, start = time.perf_counter(), time.process_time()
        # SkellamEncoding.encode's steps, one by one (integers = rotated, then rounded)
        rotated = encoding.rotated(delta, seed=seed)
        rotated_at = time.process_time()
        rounded = encoding.round_to_integers(rotated, plan.l2)
        rounded_at = time.process_time()
        noisy, _ = encoding.noise_share(dimension, add_to=rounded)
        noisy &= (1 << bits) - 1
        words = noisy.astype(word_dtype(bits))
        noised_at = time.process_time()
        add_masks(words, keys)
        reduce(words, bits)
        end = time.process_time()
        parts["total_wall"].append(time.perf_counter() - wall)
        for name, value in (("rotate", rotated_at - start), ("round", rounded_at - rotated_at),
                            ("noise", noised_at - rounded_at), ("mask", end - noised_at),
                            ("total", end - start)):
            parts[name].append(value)
    return {name: 1000 * statistics.median(values) for name, values in parts.items()}


def server_removal(cohort: int, bits: int, repeats: int) -> dict[str, Any]:
    """The server's extra work at the example's model size: regenerating and subtracting
    the excess components of ``cohort`` sites (one level each), in ms of CPU time."""
    distributed = load_config(EXAMPLES / "distributed_dp.toml")
    size = model_size(distributed)
    encoding = SkellamEncoding(_settings(bits, cohort, (cohort,)))
    total = np.zeros(encoding.words(size), word_dtype(bits))
    removed = [(os.urandom(32),) for _ in range(cohort)]
    times = []
    for _ in range(repeats):
        start = time.process_time()
        encoding.decode(total, seed=bytes(32), survivors=cohort, dimension=size, removed=removed)
        removed_at = time.process_time()
        encoding.decode(total, seed=bytes(32), survivors=cohort, dimension=size)
        times.append(((removed_at - start) - (time.process_time() - removed_at)) * 1000)
    return {"dimension": size, "cohort": cohort, "levels": 1,
            "extra_ms": statistics.median(times)}
