"""Every benchmark runs at a tiny size and prints one JSON document with sane numbers.

Timings are not asserted (benchmarks measure, tests check); what is checked is that each script
still runs against the current library and that its correctness fields hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securefl.secagg.quantize import levels_for

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run(script: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # exactly one document on stdout


def test_aggregation() -> None:
    report = run("aggregation.py", "--n", "11", "--d", "2000", "--repeats", "2", "--no-flower")
    (point,) = report["grid"]
    assert (point["n"], point["d"], point["f"]) == (11, 2000, 2)
    assert {"krum", "median", "trimmed_mean", "bulyan"} <= set(point["rules"])
    assert all(rule["seconds"] > 0 for rule in point["rules"].values())


def test_engine() -> None:
    report = run("engine.py", "--repeats", "2", "--clients", "5", "--dims", "100", "--wire")
    (row,) = report["results"]
    assert (row["clients"], row["dimension"], row["wire"]) == (5, 100, True)
    assert row["ms_per_client_round"] > 0


def test_dp() -> None:
    report = run("dp.py", "--quick", "--modes", "hooks", "--repeats", "2")
    (case,) = report["cases"]
    assert (case["model"], case["grad_sample_mode"], case["batch"]) == ("cnn", "hooks", 64)
    assert set(case["step_ms"]) == {"plain", "opacus", "securefl"}


def test_he() -> None:
    report = run("he.py", "--dimension", "5000", "--repeats", "1")
    ours = report["securefl"]
    assert ours["max_abs_error"] < 1e-6
    assert ours["upload_x_float32"] > 1  # ciphertexts are never smaller than the floats
    blind = report["blind_server"]
    assert blind["max_abs_error_of_the_model"] < 1e-6 and blind["sites"] == 10


@pytest.mark.slow
def test_secagg_quick() -> None:
    report = run("secagg.py", "--quick")
    assert report["upload"]["securefl_bytes_per_float32_byte"] <= 1.01
    for key in ("server_unmask", "server_unmask_10pct_dropout"):
        n = report[key]["n"]  # each client errs by less than one step, W c / L
        step = 100.0 * 1.0 / levels_for(n, bits="auto")  # the benchmark's W = 100, c = 1
        assert 0 < report[key]["max_abs_error"] < n * step
    for key in ("round", "round_k10"):
        assert len(set(report[key]["contributors"])) == 1
        assert report[key]["crypto_floor"]["floor_s"] > 0
        assert report[key]["crypto_floor"]["not_in_floor"]["total_s"] > 0
    assert report["large_round"]["contributors"] == 100


def test_round() -> None:
    report = run("round.py", "--rounds", "2", "--workloads", "quickstart",
                 "--variants", "plain,secagg")
    rows = report["workloads"]["quickstart"]
    assert rows["plain"]["over_plain"] == 1.0 and rows["secagg"]["aborted"] is None
    for row in (rows["plain"], rows["secagg"]):
        parts = row["breakdown_s"]
        # the buckets partition the round: they add up to the measured round time
        assert sum(parts.values()) == pytest.approx(row["median_round_s"], rel=0.01, abs=1e-4)
        assert parts["training"] > 0
    assert rows["secagg"]["breakdown_s"]["protection"] > 0
    assert rows["plain"]["breakdown_s"]["accounting"] == 0  # no DP, no accounting


@pytest.mark.slow
def test_round_startup() -> None:
    startup = run("round.py", "--startup", "--workloads", "")["startup"]
    assert (startup["distinct_searches"], startup["clients"]) == (8, 10)
    assert 0 < startup["calibration_s"] <= startup["build_simulation_s"]
    assert startup["opacus_get_noise_multiplier_s"] > 0


@pytest.mark.slow
def test_audit_quick() -> None:
    report = run("audit.py", "--seeds", "1", "--rounds", "1", "--canaries", "500")
    assert report["seeds"] == 1 and report["accountant_epsilon_max"] <= 1.0 + 1e-9
    assert set(report["caught"]) == {"noise_off", "tenth_sigma", "no_clipping",
                                         "four_times_rate"}
    assert report["cost_vs_training_median"] > 0


@pytest.mark.slow
def test_distributed_dp() -> None:
    report = run("distributed_dp.py", "--seeds", "", "--dimension", "5000", "--cost-repeats", "1")
    assert report["upload"]["ratio_vs_float32"] <= 0.55
    assert report["upload"]["quickstart_ratio_vs_float32"] <= 0.55
    cost = report["client_cost"]
    assert cost["dimension"] == 5000 and cost["ms"]["total"] > 0
    assert cost["noise_levels"] == [20] and cost["ms_without_levels"]["total"] > 0
    assert report["server_removal"]["cohort"] == 20 and report["server_removal"]["levels"] == 1


@pytest.mark.slow
def test_distributed_dp_accuracy_compares_at_one_rule_and_reports_the_noise() -> None:
    report = run("distributed_dp.py", "--seeds", "0", "--rounds", "2", "--dimension", "500",
                 "--cost-repeats", "1", "--matched-central", "--noise-price-seeds", "2")
    arms = report["accuracy"]
    central, distributed = arms["central_dp_fedavg"], arms["distributed_skellam_min_cohort_16"]
    for arm in arms.values():
        assert arm["runs"] == 1 and arm["rounds_run"] == 2 and arm["aborted_rounds"] == 0
    noise = distributed["noise"]
    # P(Binomial(2, 0.2) > 1) = 0.04 > 1e-3: both calibrated for 2 rounds
    assert noise["calibrated_rounds"] == 2
    assert noise["ratio_at_min_cohort"] == pytest.approx(1.0, abs=0.01)
    # the default level [20] removes the excess: 20 shares of mu / 19 are left, not mu / 15
    assert noise["noise_levels"] == [20]
    assert noise["ratio_full_cohort"] == pytest.approx((20 / 19) ** 0.5 * noise[
        "ratio_at_min_cohort"], rel=1e-9)
    assert noise["distributed_z_measured"] == pytest.approx(noise["distributed_z_full_cohort"],
                                                            rel=0.03)
    control = arms["central_dp_fedavg_at_the_noise_of_min_cohort_16"]
    assert control["noise_multiplier"] == noise["distributed_z_full_cohort"]
    assert distributed["difference_pp"] == pytest.approx(
        100 * (central["mean"] - distributed["mean"]))
    price = report["noise_price"]
    assert price["seeds"] == 2 and price["z"] == noise["central_z"]
    assert price["z_distributed"] == noise["distributed_z_full_cohort"]


@pytest.mark.slow
def test_distributed_dp_error_budget() -> None:
    """The two releases of the same updates differ by their noise's std alone: both arms
    train the same sample and the same first-round updates, divide by the same m, and the
    distributed release is the exact sum plus its rounding and noise parts."""
    report = run("distributed_dp_error.py", "--rounds", "3", "--repeats", "4",
                 "--release-round", "3")
    paths, release = report["paths"], report["release"]
    assert paths["same_sample_every_round"] and paths["same_round1_clients"]
    assert paths["round1_update_max_abs_difference"] == 0.0
    assert paths["central"]["denominators"] == paths["distributed"]["denominators"] == [20.0]
    assert paths["distributed"]["survivors"] == [20, 20, 20]
    assert paths["distributed"]["error_std_over_C"] == pytest.approx(
        paths["planned_z"]["distributed_full_cohort"], rel=0.05)
    assert release["wrapped_coordinates_rate"] == 0.0
    assert release["decode_minus_components_max_abs"] < 1e-6
    assert release["second_clip_smallest_factor"] > 1 - 1e-6
    assert release["rounded_sum_gain_along_true_sum"]["mean"] == pytest.approx(1.0, abs=1e-3)
    for part in ("central", "distributed_noise", "distributed_rounding"):
        assert release[part]["std_over_C"] == pytest.approx(
            release[part]["predicted_std_over_C"], rel=0.05)
    assert release["z_ratio_distributed_over_central"] == pytest.approx(
        (20 / 19) ** 0.5, rel=0.03)
