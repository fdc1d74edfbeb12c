"""Distributed DP end to end in simulation: the run, its ledger, its report and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from securefl.config import load_config
from securefl.privacy.ledger import PrivacyLedger
from securefl.simulation import run_simulation
from securefl.threat import check_config, load_threat_model
from tests.privacy.test_skellam import independent_epsilon

EXAMPLE = Path(__file__).parents[2] / "examples" / "distributed_dp.toml"


def test_a_small_distributed_run_charges_each_site_the_closed_form(tmp_path):
    config = load_config(EXAMPLE).replace(
        run__rounds=2, data__num_clients=10, server__clients_per_round=5,
        privacy__expected_cohort=5, privacy__min_cohort=4, privacy__colluding_sites=1,
        privacy__budget=100.0)  # calibrated for one round each; a second one still fits
    result = run_simulation(config, out_dir=tmp_path)
    assert [r.aborted for r in result.history.rounds] == [None, None]
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["mode"] == "distributed" and report["bits"] == 16
    assert report["min_cohort"] == 4 and report["colluding_sites"] == 1
    ledger = PrivacyLedger.open_existing(tmp_path / "privacy_ledger.sqlite")
    charged = [c for c in ledger.clients() if ledger.events(c)]
    assert len(charged) >= 5
    for client in charged:
        events = ledger.events(client)
        event = events[0]
        assert events == [event] * len(events) and event.mechanism == "skellam"
        assert event.sample_rate == 1.0
        assert event.l2_sensitivity == pytest.approx(report["l2_sensitivity"])
        closed = independent_epsilon(len(events), variance=report["skellam_variance"],
                                     l1=report["l1_sensitivity"], l2=report["l2_sensitivity"],
                                     delta=1e-5)
        assert ledger.epsilon(client) == pytest.approx(closed, rel=1e-9)
        assert report["clients"][client]["epsilon_rdp"] == pytest.approx(closed, rel=1e-9)
    assert min(ledger.epsilon(c) for c in charged) <= 8.0  # one round: the target
    # the compliance report describes the mechanism and passes its threat model's DP check
    from securefl.report import write_report

    _, markdown = write_report(tmp_path)
    text = markdown.read_text()
    assert "distributed Skellam (Agarwal, Kairouz and Liu 2021) under SecAgg+" in text
    from securefl.report.labels import label

    assert label("min_cohort") in text and label("skellam_variance") in text
    assert "PASS" in text and "distributed Skellam DP: each site adds its own" in text


@pytest.mark.parametrize("model", ["hospital-consortium", "honest-but-curious-server"])
def test_the_server_adversary_models_accept_distributed_dp(model):
    config = load_config(EXAMPLE)
    results = {r.requirement.control: r for r in check_config(config, load_threat_model(model),
                                                              deployment="network")}
    dp = results["differential_privacy"]
    assert dp.passed and "distributed Skellam DP" in dp.reason
    dp_fedavg = config.replace(privacy__mode="dp_fedavg")
    assert not {r.requirement.control: r for r in check_config(
        dp_fedavg, load_threat_model(model))}["differential_privacy"].passed
