"""The Ray start-up benchmark (``benchmarks/engine.py --backend ray --clients``) runs against
the current library and prints its timeline, CPU seconds and references in one JSON document.

Timings are not asserted (benchmarks measure, tests check): what is checked is that every mark
is there, in the order the run takes its steps, and that the CPU seconds add up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

ENGINE = Path(__file__).parents[2] / "benchmarks" / "engine.py"

#: the order in which one command reaches its marks (each after the one before)
ORDER = ("import_ray", "ray_init_start", "ray_gcs_up", "ray_api_server_up",
         "ray_raylet_launched", "ray_node_registered", "ray_init_end", "actors_submitted",
         "actors_entered", "actors_imported", "actors_built", "actors_ready", "total")


@pytest.mark.slow
def test_ray_startup_report_has_the_timeline_in_order_and_the_cpu_seconds_add_up() -> None:
    done = subprocess.run([sys.executable, str(ENGINE), "--backend", "ray", "--clients",
                           "--startup-runs", "1"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # exactly one document on stdout
    ray = report["ray_startup_seconds"]
    marks = [ray[name] for name in ORDER]  # one command: its own marks, not medians
    assert marks == sorted(marks) and marks[0] > 0
    assert ray["imports"] <= ray["actors_submitted"]  # the driver imported before the actors
    cpu = {k: v for k, v in ray.items() if k.startswith("cpu_") and k != "cpu_total"}
    if cpu:  # with psutil
        assert {"cpu_driver", "cpu_SiteHost", "cpu_raylet", "cpu_gcs_server"} <= set(cpu)
        assert ray["cpu_total"] == pytest.approx(sum(cpu.values()))
        assert report["cpu_floor_seconds"] == pytest.approx(
            ray["cpu_total"] / report["cpu_count"], abs=1e-3)
    assert set(report["ray_init_alone_seconds"]) == {"securefl", "defaults"}
    assert all(v > 0 for v in report["ray_init_alone_seconds"].values())
    assert 0 < report["inprocess_startup_seconds"]["imports"] < report[
        "inprocess_startup_seconds"]["total"]
