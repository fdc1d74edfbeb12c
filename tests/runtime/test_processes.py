"""Real processes on loopback: `securefl server` and `securefl client` with mutual TLS.

Each process imports torch, so these runs take tens of seconds on two cores: they are
marked slow (``pytest -m slow tests/runtime``).  The same scenarios run in-process, over the
same gRPC + mTLS stack, in ``test_federation.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from securefl.config import load_config
from securefl.runtime.auditlog import verify
from securefl.runtime.keys import init_he_context
from securefl.runtime.store import ServerStore
from securefl.runtime.tls import init_certificates
from securefl.simulation import run_simulation
from tests.runtime.test_federation import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def write_config(folder: Path, *, kind: str, sites: list[str], rounds: int, epochs: int = 1,
                 fraction: float = 1.0, min_clients: int = 1) -> Path:
    allowlist = init_certificates(folder / "certs", sites)
    he = ""
    if kind == "he":
        he = ("[protection.he]\npoly_modulus_degree = 4096\ncoeff_modulus_bits = [40, 30]\n"
              "scale_bits = 25\n")
    table = ", ".join(f'"{s}" = "{f}"' for s, f in allowlist.items())
    path = folder / "federation.toml"
    path.write_text(f"""
[run]
name = "processes"
rounds = {rounds}
seed = 0
[data]
dataset = "digits"
num_clients = {len(sites)}
partition = "dirichlet"
alpha = 0.5
[model]
name = "logistic"
[client]
epochs = {epochs}
batch_size = 16
lr = 0.1
[server]
fraction = {fraction}
min_clients = {min_clients}
{'evaluate = "federated"' if kind == "he" else ""}
[protection]
kind = "{kind}"
{he}
[network]
address = "127.0.0.1:{free_port()}"
certs = "{folder / 'certs'}"
state_dir = "{folder / 'state'}"
client_state_dir = "{folder / 'sites'}"
round_timeout = 60.0
connect_timeout = 90.0
reconnect_timeout = 90.0
allowlist = {{ {table} }}
""")
    if kind == "he":
        init_he_context(folder / "certs", load_config(path).protection.he)
    return path


def start(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "securefl.cli", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_federation(config: Path, sites: list[str]):
    folder = config.parent
    server = start("server", str(config), log=folder / "server.log")
    clients = {s: start("client", str(config), "--site", s, log=folder / f"{s}.log")
               for s in sites}
    return server, clients


def finish(server: subprocess.Popen, clients: dict, timeout: float = 300) -> None:
    try:
        assert server.wait(timeout) == 0
        for proc in clients.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc in [server, *clients.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def final_vector(state: Path) -> np.ndarray:
    tensors = load_file(state / "model.safetensors")
    return np.concatenate([tensors[k].ravel() for k in sorted(tensors)])


def wait_for_round(state: Path, rnd: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = state / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= rnd:
            return
        time.sleep(0.05)
    raise AssertionError(f"round {rnd} did not complete")


SITES = [f"client-{i}" for i in range(5)]


def simulate_single_threaded(config_path: Path):
    """The in-process simulation with one torch thread, as in the processes
    (OMP_NUM_THREADS=1), so that floating-point sums run in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_simulation(load_config(config_path))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["plain", "secagg", "he"])
def test_server_and_five_client_processes_match_the_simulation(tmp_path, kind):
    config_path = write_config(tmp_path, kind=kind, sites=SITES, rounds=3)
    server, clients = start_federation(config_path, SITES)
    finish(server, clients)
    assert all(c.wait(30) == 0 for c in clients.values())
    summary = json.loads((tmp_path / "state" / "summary.json").read_text())
    simulated = simulate_single_threaded(config_path)
    expected = simulated.history.final.accuracy
    if kind == "plain":
        from securefl.runtime.store import model_hash

        assert summary["model_sha256"] == model_hash(simulated.parameters)
    else:
        assert summary["final_accuracy"] == pytest.approx(expected, abs=0.02)
    assert verify(tmp_path / "state").ok


def test_client_process_killed_mid_round_the_round_completes(tmp_path):
    config_path = write_config(tmp_path, kind="secagg", sites=SITES, rounds=3, epochs=150)
    server, clients = start_federation(config_path, SITES)
    wait_for_round(tmp_path / "state", 1)
    time.sleep(0.3)  # round 2 is under way (150 local epochs take seconds)
    clients["client-3"].send_signal(signal.SIGKILL)
    finish(server, clients)
    rows = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").open()]
    assert [r["aborted"] for r in rows] == [None, None, None]
    assert rows[1]["dropped"] == {"client-3": "disconnected"}  # it died mid-round
    assert sorted(rows[1]["clients"]) == sorted(set(SITES) - {"client-3"})
    assert rows[2]["dropped"] == {"client-3": "not connected"}


def test_server_process_killed_then_resumed(tmp_path):
    config_path = write_config(tmp_path, kind="plain", sites=SITES, rounds=4)
    state = tmp_path / "state"
    server, clients = start_federation(config_path, SITES)
    wait_for_round(state, 2)
    server.send_signal(signal.SIGKILL)
    server.wait(30)
    resumed = start("server", str(config_path), "--resume", log=tmp_path / "resumed.log")
    finish(resumed, clients)
    store = ServerStore(state)
    rounds = store.rounds()
    store.close()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["status"] == "completed" for r in rounds)
    report = verify(state)
    assert report.ok
    starts = [e["data"]["round"] for e in report.events if e["event"] == "round_start"]
    ends = [e["data"]["round"] for e in report.events if e["event"] == "round_end"]
    assert ends == [1, 2, 3, 4] and starts[:2] == [1, 2] and set(starts) == {1, 2, 3, 4}
    summary = json.loads((state / "summary.json").read_text())
    assert summary["resumed_from"] >= 2
    # killed anywhere in round 3, the redone round reproduces the lost attempt
    from securefl.runtime.store import model_hash

    assert summary["model_sha256"] == model_hash(
        simulate_single_threaded(config_path).parameters)


def test_soak_twenty_clients_ten_rounds_two_killed(tmp_path):
    sites = [f"client-{i:02d}" for i in range(20)]
    config_path = write_config(tmp_path, kind="secagg", sites=sites, rounds=10, epochs=5,
                               fraction=0.5, min_clients=5)
    server, clients = start_federation(config_path, sites)
    wait_for_round(tmp_path / "state", 3, timeout=400)
    time.sleep(0.2)
    clients["client-04"].send_signal(signal.SIGKILL)
    wait_for_round(tmp_path / "state", 6, timeout=400)
    time.sleep(0.2)
    clients["client-13"].send_signal(signal.SIGKILL)
    finish(server, clients, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").open()]
    assert len(rows) == 10 and all(r["aborted"] is None for r in rows)
    assert all("client-04" not in r["clients"] for r in rows[4:])
    assert verify(tmp_path / "state").ok
