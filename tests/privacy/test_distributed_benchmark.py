"""The accuracy benchmark of distributed DP interleaves its arms (a drift of the machine
over the benchmark falls on every arm alike) and reports every round short of the cohort."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from securefl.engine.history import History, RoundRecord

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "distributed_dp.py"


def load_benchmark(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")  # the script's setdefault, undone after the test
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: its own folder first
    spec = importlib.util.spec_from_file_location("distributed_dp_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arms_run_in_turn_and_short_rounds_are_counted(monkeypatch):
    bench = load_benchmark(monkeypatch)
    calls = []

    def simulate(config):
        arm = (config.privacy.mode, config.privacy.noise_multiplier is not None)
        calls.append((arm, config.run.seed))
        short = config.privacy.mode == "distributed" and config.run.seed == 1
        ids = [f"c{i}" for i in range(19 if short else 20)]
        rounds = [RoundRecord(round=r, clients=ids, accuracy=0.5 + r / 100,
                              dropped={"c19": "missed"} if short else {}) for r in (1, 2)]
        return SimpleNamespace(history=History(rounds=rounds))

    monkeypatch.setattr(bench, "run_simulation", simulate)
    monkeypatch.setattr(bench, "noise", lambda central, config: {"distributed_z_full_cohort": 2.4})
    out = bench.accuracy([0, 1], 2, 2, [], matched=True)
    central, distributed, control = ("dp_fedavg", False), ("distributed", False), ("dp_fedavg",
                                                                                    True)
    assert calls == [(arm, seed) for seed in (0, 1) for _ in range(2)
                     for arm in (central, distributed, control)]
    arm = out["distributed_skellam_min_cohort_16"]
    assert arm["runs"] == 4 and arm["rounds_run"] == 8 and arm["mean"] == 0.52
    assert arm["rounds_short_of_the_cohort"] == 4 and arm["fewest_updates_in_a_round"] == 19
    assert arm["dropped"] == 4 and arm["declined"] == arm["rejected"] == 0
    for name in ("central_dp_fedavg", "central_dp_fedavg_at_the_noise_of_min_cohort_16"):
        assert out[name]["rounds_short_of_the_cohort"] == 0 and out[name]["runs"] == 4
        assert out[name]["fewest_updates_in_a_round"] == 20
    assert out["central_dp_fedavg_at_the_noise_of_min_cohort_16"]["noise_multiplier"] == 2.4
    assert arm["paired_difference_per_seed_pp"] == [0.0, 0.0]
