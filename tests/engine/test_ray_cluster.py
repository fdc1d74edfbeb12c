"""A federation across a real two-node Ray cluster started on this machine (``ray start``).

Each node advertises its own loopback address (127.0.0.2 head, 127.0.0.3 worker; Ray turns
127.0.0.1 into the machine's outward address once multi-node is on), and the cluster needs a
token that this test makes (``RAY_AUTH_MODE=token``).  Ray's multi-node servers listen on all
interfaces, which no Ray option narrows: the token is what keeps others out.  Both nodes are
``ray start --block`` processes of this test, stopped by their pid in ``finally``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from securefl.config import load_config
from securefl.simulation import run_simulation

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-node driver: loopback
ray = pytest.importorskip("ray")

ROOT = Path(__file__).parents[2]
HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ray_command() -> list[str]:
    ray_bin = Path(sys.executable).with_name("ray")
    return [str(ray_bin)] if ray_bin.exists() else [shutil.which("ray") or "ray"]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # ray start --block stops its node on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "PYTHONPATH"):
        monkeypatch.setenv(key, env[key])
    port = free_port(HEAD)
    address = f"{HEAD}:{port}"
    started: list[subprocess.Popen] = []
    # its own temp dir: `ray start` leaves its address there, not where ray.init() looks
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats", f"--temp-dir={temp}"]
    try:
        started.append(subprocess.Popen(
            [*ray_command(), "start", "--head", f"--node-ip-address={HEAD}", f"--port={port}",
             "--include-dashboard=false", *common], env=env, stdout=tmp_path.joinpath(
                 "head.log").open("w"), stderr=subprocess.STDOUT))
        started.append(subprocess.Popen(
            [*ray_command(), "start", f"--address={address}", f"--node-ip-address={WORKER}",
             *common], env=env, stdout=tmp_path.joinpath("worker.log").open("w"),
            stderr=subprocess.STDOUT))
        yield address, started
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_nodes(address: str, count: int, started: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in started), "a ray start process exited"
        probe = subprocess.run(
            [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], "
             "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))", address],
            capture_output=True, text=True, timeout=60, check=False)
        if probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster at {address} did not reach {count} nodes in 120 s")


@pytest.mark.slow
def test_a_federation_runs_across_two_nodes_as_it_runs_in_process(cluster, tmp_path):
    address, started = cluster
    wait_for_nodes(address, 2, started)
    config = load_config(ROOT / "examples" / "secagg.toml").replace(
        run__rounds=2, client__epochs=1, simulation__dropout=0.1)
    # two actors of one CPU each on two one-CPU nodes: one actor on each node
    spread = config.replace(simulation__backend="ray", simulation__actors=2,
                            simulation__cpus=1.0, simulation__address=address)
    (tmp_path / "cluster.toml").write_text(spread.to_toml())
    done = subprocess.run([sys.executable, "-m", "securefl.cli", "run", "cluster.toml",
                           "--out", "run", "--quiet"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run_simulation(config, out_dir=tmp_path / "here")
    there, here = (
        ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()],
         load_file(str(tmp_path / name / "model.safetensors"))) for name in ("run", "here"))
    assert there[0][0]["aborted"] is None and len(there[0][0]["clients"]) >= 5
    for key in ("clients", "dropped", "sampled", "aborted", "redone"):
        assert [r.get(key) for r in there[0]] == [r.get(key) for r in here[0]]
    assert sum(len(r["dropped"]) for r in here[0]) >= 1  # p = 0.1 over 2 x 10 sites
    assert sorted(there[1]) == sorted(here[1])
    assert max(np.abs(there[1][k] - here[1][k]).max() for k in here[1]) < 1e-4  # quantization
