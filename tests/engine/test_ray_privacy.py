"""``[privacy]`` on the Ray backend: each site's ledger lives in its actor, and a run gives the
in-process run's metrics, model and privacy report (``privacy.json``): every site's rounds,
epsilon and history, its noise multiplier, and the budget refusals.  One local Ray (2 CPUs,
loopback) serves the module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from securefl import cli
from securefl.config import load_config
from securefl.errors import ConfigError
from securefl.privacy.ledger import LEDGER_FILE, PrivacyLedger
from securefl.simulation import build_simulation, run_simulation

pytest.importorskip("ray")

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


def both(config, tmp_path):
    """The in-process run and the Ray run (2 actors) of ``config``, with their reports."""
    runs = {}
    for backend in ("inprocess", "ray"):
        out = tmp_path / backend
        result = run_simulation(config.replace(simulation__backend=backend,
                                               simulation__actors=2), out_dir=out)
        runs[backend] = result, json.loads((out / "privacy.json").read_text())
    return runs["inprocess"], runs["ray"]


def assert_same(there: object, here: object, path: str = "") -> None:
    """Equal documents, floats to 1e-12 relative: an accountant's epsilon is a float
    computation that the actors (Ray sets one BLAS thread in its workers) and the driver may
    round differently in the last place."""
    if isinstance(here, dict) and isinstance(there, dict):
        assert there.keys() == here.keys(), path
        for key in here:
            assert_same(there[key], here[key], f"{path}/{key}")
    elif isinstance(here, float) and isinstance(there, float):
        assert math.isclose(there, here, rel_tol=1e-12), (path, there, here)
    else:
        assert there == here, path


def same_report(here: dict, there: dict, tmp_path: Path, *, same_models: bool = True) -> None:
    """Equal documents, and equal ledger files: the Ray run's is the copy of its actors'
    ledgers, each site's charges in its order, which ``securefl privacy report`` reads
    (the releases, hashes of the models trained from, only where both runs' models agree)."""
    assert here["ledger"] == there["ledger"] == "privacy_ledger.sqlite"
    assert_same(there, here)
    with PrivacyLedger.open_existing(tmp_path / "inprocess" / LEDGER_FILE) as a, \
            PrivacyLedger.open_existing(tmp_path / "ray" / LEDGER_FILE) as b:
        assert b.clients() == a.clients()
        for cid in a.clients():
            keep = slice(None) if same_models else slice(0, 2)
            assert [c[keep] for c in b.charges(cid)] == [c[keep] for c in a.charges(cid)]
            assert b.epsilon(cid) == a.epsilon(cid)


def test_dp_sgd_on_ray_is_the_in_process_run_and_its_ledgers_refuse_the_same_rounds(tmp_path):
    # sigma 0.8 at each site's own sample rate against a budget of 7: the two smallest sites
    # refuse round 1 already, five more refuse round 2
    config = load_config(EXAMPLES / "dp_sgd.toml").replace(
        run__rounds=2, client__epochs=1, privacy__target_epsilon=None,
        privacy__noise_multiplier=0.8, privacy__budget=7.0)
    (here, report), (there, ray_report) = both(config, tmp_path)
    assert there.history.metric("accuracy") == here.history.metric("accuracy")
    np.testing.assert_array_equal(there.parameters, here.parameters)
    declined = [r.declined for r in there.history.rounds]
    assert declined == [r.declined for r in here.history.rounds]
    assert [len(d) for d in declined] == [2, 5]
    assert all("over its budget 7" in why for d in declined for why in d.values())
    entries = ray_report["clients"]
    assert sorted(c for c, e in entries.items() if e["rounds"] == 0) == sorted(declined[0])
    assert entries["client-0"]["history"] == [[1, pytest.approx(6.452, abs=1e-3)]]
    same_report(report, ray_report, tmp_path)
    written = (tmp_path / "ray" / "privacy.json").read_text()
    assert cli.main(["privacy", "report", str(tmp_path / "ray")]) == 0  # reads the copy
    again = json.loads((tmp_path / "ray" / "privacy.json").read_text())
    assert_same(again["clients"], json.loads(written)["clients"])  # every site's rounds, ε


@pytest.mark.slow
def test_dp_fedavg_public_sample_on_ray_is_the_in_process_run(tmp_path):
    config = load_config(EXAMPLES / "dp_fedavg.toml").replace(
        run__rounds=2, client__epochs=1, data__num_clients=10, server__clients_per_round=5,
        privacy__adaptive_clipping=False, privacy__sampling="public")
    (here, report), (there, ray_report) = both(config, tmp_path)
    assert [r.clients for r in there.history.rounds] == [r.clients for r in here.history.rounds]
    assert there.history.metric("accuracy") == here.history.metric("accuracy")
    np.testing.assert_array_equal(there.parameters, here.parameters)
    taken = [e.get("rounds_taken_part", 0) for e in ray_report["clients"].values()]
    # calibrated for the one round a site expects (5 of 10 per round, 2 rounds): a site
    # sampled twice declines the second; one never sampled is charged nothing
    assert sum(taken) == sum(len(r.clients) for r in there.history.rounds) and 0 in taken
    assert there.history.rounds[1].declined == here.history.rounds[1].declined != {}
    same_report(report, ray_report, tmp_path)


@pytest.mark.slow
def test_dp_fedavg_secret_sample_charges_every_site_every_round_as_in_process(tmp_path):
    """The secret sample and the noise come from the CSPRNG (the runs differ); each round
    costs every site, sampled or not, so every ledger holds the same charges."""
    config = load_config(EXAMPLES / "dp_fedavg.toml").replace(
        run__rounds=2, client__epochs=1, data__num_clients=10, server__clients_per_round=3,
        privacy__adaptive_clipping=False)
    (here, report), (there, ray_report) = both(config, tmp_path)
    assert [r.aborted for r in there.history.rounds] == [None, None]
    assert [r.aborted for r in here.history.rounds] == [None, None]
    for entry, ours in zip(report["clients"].values(), ray_report["clients"].values(),
                           strict=True):
        assert ours["rounds"] == entry["rounds"] == 2
        assert ours["history"] == entry["history"]
        assert ours["epsilon_secret_sampling"] == entry["epsilon_secret_sampling"]
    assert "clients" not in json.loads((tmp_path / "ray" / "metrics.jsonl").read_text()
                                       .splitlines()[0])  # who took part stays secret


@pytest.mark.slow
def test_distributed_dp_on_ray_charges_what_the_in_process_ledgers_charge(tmp_path):
    """The noise shares are each site's CSPRNG draws: the runs agree in everything but
    their values (as the networked distributed DP run does)."""
    config = load_config(EXAMPLES / "distributed_dp.toml").replace(
        run__rounds=2, client__epochs=1, data__num_clients=10, server__clients_per_round=5,
        privacy__target_epsilon=200.0, privacy__expected_cohort=5, privacy__min_cohort=4,
        privacy__colluding_sites=1, privacy__noise_levels=(5,), privacy__budget=1000.0)
    (here, report), (there, ray_report) = both(config, tmp_path)
    assert [r.clients for r in there.history.rounds] == [r.clients for r in here.history.rounds]
    assert [r.aborted for r in there.history.rounds] == [None, None]
    assert np.isfinite(there.parameters).all()
    # above chance (0.1): the noise is fresh CSPRNG draws, so the level varies from run to run
    assert there.history.final.accuracy > 0.15 and here.history.final.accuracy > 0.15
    charged = [e for e in ray_report["clients"].values() if e["rounds"]]
    assert len(charged) >= 5 and {e["mechanism"] for e in charged} == {"skellam"}
    same_report(report, ray_report, tmp_path, same_models=False)


def test_adaptive_clipping_is_refused_on_ray_in_one_line():
    config = load_config(EXAMPLES / "dp_fedavg.toml").replace(simulation__backend="ray")
    with pytest.raises(ConfigError) as info:
        build_simulation(config)
    assert "\n" not in str(info.value) and "adaptive_clipping = true" in str(info.value)
