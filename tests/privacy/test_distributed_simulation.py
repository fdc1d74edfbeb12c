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
        privacy__noise_levels=(5,),
        privacy__budget=100.0)  # calibrated for one round each; a second one still fits
    result = run_simulation(config, out_dir=tmp_path)
    assert [r.aborted for r in result.history.rounds] == [None, None]
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["mode"] == "distributed" and report["bits"] == 16
    assert report["min_cohort"] == 4 and report["colluding_sites"] == 1
    assert report["noise_levels"] == [5]
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


def budget_for_one_round(config) -> float:
    """A budget between one round's closed-form epsilon and two rounds'."""
    from securefl.privacy import distributed_settings
    from securefl.simulation import build_simulation

    size = build_simulation(config).server.parameters.size
    plan = distributed_settings(config, config.data.num_clients).plan(size)
    one, two = (independent_epsilon(r, variance=plan.variance, l1=plan.l1, l2=plan.l2,
                                    delta=config.privacy.delta) for r in (1, 2))
    assert one < two
    return (one + two) / 2


def small(**changes):
    table = {"data__num_clients": 10, "server__clients_per_round": 5,
             "model__name": "logistic", "privacy__expected_cohort": 5,
             "privacy__min_cohort": 4, "privacy__colluding_sites": 1,
             "privacy__noise_levels": (5,), **changes}
    return load_config(EXAMPLE).replace(**table)


def test_a_round_that_sites_out_of_budget_leave_below_min_cohort_is_not_started(tmp_path,
                                                                                caplog):
    config = small(run__rounds=6)
    config = config.replace(privacy__budget=budget_for_one_round(config))
    result = run_simulation(config, out_dir=tmp_path)
    rounds = result.history.rounds
    exhausted: set[str] = set()
    not_started = 0
    for record in rounds:
        if record.aborted and record.aborted.startswith("not started"):
            not_started += 1
            # known before the round: nothing sent, trained or unmasked
            assert record.clients == [] and record.update_norm is None
            assert set(record.declined) <= exhausted
            live = [c for c in record.sampled if c not in exhausted]
            assert len(live) < 4 and f"{len(live)} of 5 clients have privacy budget left" \
                in record.aborted
        elif record.aborted:  # a decline the server could not know yet
            assert set(record.declined) - exhausted
        exhausted |= set(record.declined)
    assert not_started >= 1
    assert caplog.text.count("not started:") == not_started  # one line each
    # the budget pays for one round: no site is charged twice, none beyond its budget
    ledger = PrivacyLedger.open_existing(tmp_path / "privacy_ledger.sqlite")
    for client in ledger.clients():
        assert len(ledger.events(client)) <= 1
        assert ledger.epsilon(client) <= config.privacy.budget
    assert exhausted and all(len(ledger.events(c)) == 1 for c in exhausted)


def test_a_run_stops_cleanly_when_no_round_can_reach_min_cohort(tmp_path, caplog):
    config = small(run__rounds=5, data__num_clients=5)
    config = config.replace(privacy__budget=budget_for_one_round(config))
    result = run_simulation(config, out_dir=tmp_path)
    first, second = result.history.rounds  # all five decline round 2; no round 3 is started
    assert first.aborted is None and len(first.clients) == 5
    assert second.clients == [] and sorted(second.declined) == sorted(first.clients)
    assert result.history.stopped == ("stopped before round 3: 0 of 5 clients have privacy "
                                      "budget left (the others declined an earlier round): 0 "
                                      "survivors, below the minimum cohort 4 that distributed "
                                      "DP's noise is calibrated for")
    assert caplog.text.count("stopped before round 3") == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == result.history.stopped and summary["rounds"] == 2
    ledger = PrivacyLedger.open_existing(tmp_path / "privacy_ledger.sqlite")
    assert {len(ledger.events(c)) for c in ledger.clients()} == {1}


def test_calibrated_for_the_quantile_every_round_runs_and_no_site_overspends(tmp_path):
    """12 rounds of 5 of 10 sites: for the expected 6 participations, sites sampled more
    often run out and a late round fails; for the 0.999-quantile (11), every round runs."""
    from securefl.privacy import distributed_settings

    expected = run_simulation(small(run__rounds=12, privacy__participation_quantile=0.5))
    assert any(r.aborted for r in expected.history.rounds)
    config = small(run__rounds=12)
    settings = distributed_settings(config, 10)
    assert settings.steps == 11  # P(Binomial(12, 1/2) > 11) = 2^-12
    result = run_simulation(config, out_dir=tmp_path)
    assert [r.aborted for r in result.history.rounds] == [None] * 12
    assert all(len(r.clients) == 5 and not r.declined for r in result.history.rounds)
    ledger = PrivacyLedger.open_existing(tmp_path / "privacy_ledger.sqlite")
    taken = {c: len(ledger.events(c)) for c in ledger.clients()}
    assert sum(taken.values()) == 60 and max(taken.values()) > 6
    for client, count in taken.items():  # charged exactly what it spent, within its budget
        assert count <= settings.steps and ledger.epsilon(client) <= 8.0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["calibrated_rounds"] == 11
