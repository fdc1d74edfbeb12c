"""End to end through the engine: budgets enforced by clients, ``privacy report`` outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from securefl.cli import main
from securefl.config import Config, config_from_dict
from securefl.privacy import LEDGER_FILE
from securefl.privacy.accounting import PrivacyEvent, epsilon
from securefl.privacy.ledger import LedgerError, PrivacyLedger
from securefl.simulation import RunResult, run_simulation


def small(rounds: int = 3, **privacy: object) -> Config:
    return config_from_dict({
        "run": {"rounds": rounds, "seed": 1},
        "data": {"dataset": "digits", "num_clients": 3, "partition": "iid"},
        "model": {"name": "mlp", "hidden": [16]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.2},
        "privacy": privacy})


def run(config: Config, out: Path) -> RunResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_simulation(config, out_dir=out)


def test_dp_sgd_run_writes_ledger_and_report(tmp_path: Path) -> None:
    result = run(small(mode="dp_sgd", target_epsilon=4.0), tmp_path)
    assert all(rec.declined == {} and len(rec.clients) == 3 for rec in result.history.rounds)
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert (tmp_path / "epsilon.png").stat().st_size > 1000
    assert summary["delta"] == 1e-5 and summary["accountant"] == "rdp"
    with PrivacyLedger.open_existing(tmp_path / LEDGER_FILE) as ledger:
        for cid, entry in summary["clients"].items():
            assert entry["rounds"] == 3
            assert entry["epsilon_rdp"] == ledger.epsilon(cid)
            assert entry["epsilon_prv"] == ledger.epsilon(cid, accountant="prv")
            # calibrated for exactly this run: the whole budget, never more
            assert 4.0 - 0.011 <= entry["epsilon_rdp"] <= 4.0 == entry["budget"]
            assert entry["remaining"] == pytest.approx(4.0 - entry["epsilon_rdp"])
            assert entry["epsilon_prv"] < entry["epsilon_rdp"]
            events = ledger.events(cid)
            assert entry["epsilon_rdp"] == epsilon(events, delta=1e-5)
    # another run (other models, same round numbers) in the same directory: every release is
    # charged again, the spend carries over
    run(small(mode="dp_sgd", target_epsilon=4.0, budget=100.0).replace(run__seed=2), tmp_path)
    again = json.loads((tmp_path / "privacy.json").read_text())["clients"]
    with PrivacyLedger.open_existing(tmp_path / LEDGER_FILE) as ledger:
        for cid, entry in again.items():
            assert entry["rounds"] == 6 and ledger.rounds(cid) == [1, 2, 3, 1, 2, 3]
            assert entry["epsilon_rdp"] == epsilon(ledger.events(cid), delta=1e-5)
            assert entry["epsilon_rdp"] > summary["clients"][cid]["epsilon_rdp"]


def test_tiny_budget_clients_decline_and_never_exceed(tmp_path: Path) -> None:
    # sigma fixed, budget a little above one round's epsilon: round 2 is refused by everyone
    probe = run(small(rounds=1, mode="dp_sgd", noise_multiplier=1.5), tmp_path / "probe")
    one_round = max(e["epsilon_rdp"] for e in
                    json.loads((probe.run_dir / "privacy.json").read_text())["clients"].values())
    config = small(rounds=3, mode="dp_sgd", noise_multiplier=1.5, budget=one_round * 1.2)
    result = run(config, tmp_path / "run")
    first, second, third = result.history.rounds
    assert first.declined == {} and len(first.clients) == 3
    for record in (second, third):
        assert set(record.declined) == {"client-0", "client-1", "client-2"}
        assert all("over its budget" in reason for reason in record.declined.values())
        assert record.clients == []
    summary = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for entry in summary["clients"].values():
        assert entry["rounds"] == 1 and entry["within_budget"]
        assert entry["epsilon_rdp"] <= entry["budget"]


def test_dp_fedavg_secret_sample_charges_every_client_every_round(tmp_path: Path) -> None:
    config = small(rounds=3, mode="dp_fedavg", noise_multiplier=0.8, clip_norm=0.5,
                   delta=1e-3, sampling="secret").replace(server__clients_per_round=2)
    result = run(config, tmp_path)
    assert all(len(rec.clients) == 2 for rec in result.history.rounds)
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["sampling"] == "secret" and summary["secure_randomness"] is True
    values = {e["epsilon_rdp"] for e in summary["clients"].values()}
    assert len(values) == 1  # user-level: every client spent the same
    secret = epsilon([PrivacyEvent("dp_fedavg", 0.8, 2 / 3, 3)], delta=1e-3)
    for entry in summary["clients"].values():
        assert entry["rounds"] == 3 and entry["sample_rate"] == pytest.approx(2 / 3)
        assert entry["epsilon_secret_sampling"] == pytest.approx(secret) == entry["epsilon_rdp"]
        taken = entry["rounds_taken_part"]
        assert entry["epsilon_public_sampling"] == epsilon(
            [PrivacyEvent("dp_fedavg", 0.8, 1.0, taken)] if taken else [], delta=1e-3)
    assert sum(e["rounds_taken_part"] for e in summary["clients"].values()) == 6
    # nobody outside the server learns who took part: the run directory does not say
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert not {"clients", "sampled", "client_metrics"} & set(row)
        assert "client-" not in line


def test_dp_fedavg_public_sample_charges_q_1_per_round_taken_part(tmp_path: Path) -> None:
    config = small(rounds=3, mode="dp_fedavg", noise_multiplier=0.8, clip_norm=0.5,
                   delta=1e-3).replace(server__clients_per_round=2)
    result = run(config, tmp_path)
    summary = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["sampling"] == "public"
    for cid, entry in summary["clients"].items():
        taken = [r.round for r in result.history.rounds if cid in r.clients]
        assert [r for r, _ in entry["history"]] == taken
        assert entry["epsilon_rdp"] == entry["epsilon_public_sampling"] == epsilon(
            [PrivacyEvent("dp_fedavg", 0.8, 1.0, len(taken))] if taken else [], delta=1e-3)
        assert entry["epsilon_secret_sampling"] == epsilon(
            [PrivacyEvent("dp_fedavg", 0.8, 2 / 3, 3)], delta=1e-3)


def test_dp_fedavg_runs_on_secure_aggregation(tmp_path: Path) -> None:
    secagg = config_from_dict({"protection": {"kind": "secagg"}}).protection
    config = small(rounds=2, mode="dp_fedavg", noise_multiplier=0.8, clip_norm=0.5,
                   delta=1e-3).replace(protection=secagg)
    result = run(config, tmp_path)
    assert all(len(rec.clients) == 3 and rec.aborted is None for rec in result.history.rounds)
    event = PrivacyEvent("dp_fedavg", 0.8, 1.0, 1)
    for entry in json.loads((tmp_path / "privacy.json").read_text())["clients"].values():
        assert entry["epsilon_rdp"] == epsilon([event, event], delta=1e-3)


def test_privacy_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PrivacyLedger(tmp_path / LEDGER_FILE, delta=1e-5,
                       budgets={"site-a": 3.0, "site-b": None}) as ledger:
        for rnd in (1, 2, 3):
            ledger.charge("site-a", PrivacyEvent("dp_sgd", 2.0, 0.1, 20), round=rnd)
        spent = ledger.epsilon("site-a")
    assert main(["privacy", "report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "site-a" in printed and "site-b" in printed and f"{spent:.3f}" in printed
    summary = json.loads((tmp_path / "privacy.json").read_text())
    entry = summary["clients"]["site-a"]
    assert entry["rounds"] == 3 and entry["steps"] == 60
    assert entry["epsilon_rdp"] == spent
    assert entry["remaining"] == pytest.approx(3.0 - spent)
    assert [r for r, _ in entry["history"]] == [1, 2, 3]
    assert summary["clients"]["site-b"] == {**summary["clients"]["site-b"], "rounds": 0,
                                            "budget": None, "remaining": None}
    assert (tmp_path / "epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_privacy_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "report", str(tmp_path)]) == 2
    assert "no privacy_ledger.sqlite" in capsys.readouterr().err
    (tmp_path / LEDGER_FILE).write_bytes(b"garbage" * 50)
    assert main(["privacy", "report", str(tmp_path)]) == 2
    assert "privacy ledger" in capsys.readouterr().err
    with pytest.raises(LedgerError):
        PrivacyLedger.open_existing(tmp_path / LEDGER_FILE)
