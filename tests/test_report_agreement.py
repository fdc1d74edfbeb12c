"""The compliance report of a SecAgg simulation and of an HE simulation states ε, controls and
verdict as ``privacy report``, ``check`` and ``audit verify`` do.  (A DP deployment's:
tests/runtime/test_evidence.py, on the module's networked run.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.cli import main
from tests.report_agreement import (
    audit_verify,
    check_results,
    compliance_report,
    privacy_report,
    report_epsilon,
    requirement_results,
    verdict,
)

BASE = """
[run]
name = "agree"
rounds = 1
seed = 0
threat_model = "honest-but-curious-server"

[data]
dataset = "digits"
num_clients = 4
partition = "iid"

[model]
name = "logistic"

[client]
epochs = 1
batch_size = 32
lr = 0.1

[server]
evaluate = "central"

[aggregation]
rule = "fedavg"
"""

SECAGG_DP = BASE + """
[protection]
kind = "secagg"

[privacy]
mode = "dp_sgd"
noise_multiplier = 1.0
delta = 1e-5
budget = 50.0
"""

HE = BASE.replace("honest-but-curious-server", "research-simulation") + """
[protection]
kind = "he"

[protection.he]
poly_modulus_degree = 4096
coeff_modulus_bits = [40, 30]
scale_bits = 25
"""


def _run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    config = tmp_path / "c.toml"
    config.write_text(text)
    out = tmp_path / "run"
    assert main(["-q", "run", str(config), "--out", str(out)]) == 0
    capsys.readouterr()
    return config, out


def _controls_agree(report, config: Path, model: str, capsys) -> dict[str, tuple[str, str]]:
    checked = check_results(config, model, "simulation", capsys)
    assert requirement_results(report) == checked
    rows = verdict(report)
    failing = [k for k, v in checked.items() if v == "FAIL"]
    assert rows["Threat-model controls"][0] == ("FAIL" if failing else "PASS")
    assert all(f in rows["Threat-model controls"][1] for f in failing)
    return rows


def _no_audit_log(report, run: Path, capsys) -> None:
    code, out = audit_verify(run, capsys)
    assert code == 1 and "an in-process simulation (securefl run) does not" in out
    assert verdict(report)["Signed audit log"] == (
        "—", "none: an in-process simulation writes no audit log")


def test_a_secagg_dp_simulation_report_agrees(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    config, run = _run(tmp_path, SECAGG_DP, capsys)
    report = compliance_report(run, capsys)
    spent = privacy_report(run, capsys)  # the ledgers, by the enforcing accountant (RDP)
    assert sorted(spent) == [f"client-{i}" for i in range(4)]
    assert report_epsilon(report) == pytest.approx(spent, abs=5e-4)
    assert report.paragraphs["privacy"][0] == ("Source of every ε in this report: the "
                                               "clients' privacy ledgers.")
    rows = _controls_agree(report, config, "honest-but-curious-server", capsys)
    assert rows["Privacy spent"][0] == "PASS"
    assert rows["Privacy spent"][1].startswith(
        f"largest ε {max(spent.values()):.4g} at δ = 1e-05 over 4 clients, budget 50")
    assert rows["Rounds"] == ("PASS", "1 aggregated of 1 planned, 0 aborted or empty")
    _no_audit_log(report, run, capsys)
    headline = report.paragraphs["verdict"][0]
    assert headline.endswith(f"Spent: at most ε = {max(spent.values()):.4g} per client.")
    assert headline.startswith("Verdict: every recorded control held"
                               if rows["Threat-model controls"][0] == "PASS"
                               else "Verdict: needs attention")


def test_an_he_simulation_report_agrees(tmp_path, capsys) -> None:
    config, run = _run(tmp_path, HE, capsys)
    report = compliance_report(run, capsys)
    # no DP: the report spends no ε, and `privacy report` finds no ledger to report
    assert main(["privacy", "report", str(run)]) == 2
    assert "no privacy_ledger.sqlite" in capsys.readouterr().err
    assert "No ε was accounted: the run used no differential privacy." in \
        report.paragraphs["privacy"]
    rows = _controls_agree(report, config, "research-simulation", capsys)
    assert rows["Threat-model controls"] == (
        "PASS", "research-simulation: all 2 hold (checked as a simulation run)")
    assert rows["Privacy spent"] == ("—", "no differential privacy ([privacy] mode = \"none\")")
    assert report.paragraphs["verdict"][0].endswith(
        "No ε was spent: the run used no differential privacy.")
    protection = dict(row for row in report.tables["protection"][0][1:])
    assert protection["Protection"] == "homomorphic encryption (CKKS)"
    assert protection["CKKS ring degree"] == "4096"
    _no_audit_log(report, run, capsys)
