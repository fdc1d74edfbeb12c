"""``securefl check``: one line per requirement, exit status 0 only when all pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl.cli import main

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "threat_configs" / "quickstart.toml"
HOSPITAL_MISSING = ("mutual-tls", "authenticated-sites", "differential-privacy",
                    "per-site-budget", "hide-site-updates", "signed-audit-log")


@pytest.mark.parametrize("config", [FIXTURE, ROOT / "examples" / "quickstart.toml"],
                         ids=["fixture", "examples"])
def test_quickstart_meets_research_simulation(config: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    if not config.exists():
        pytest.skip(f"{config} is not in this checkout")
    assert main(["check", str(config), "--threat-model", "research-simulation"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threat model research-simulation:")
    assert [line.split()[:2] for line in lines[1:3]] == [
        ["PASS", "coherent-configuration:"], ["PASS", "in-process-only:"]]
    assert lines[3] == "2 of 2 requirements pass"


@pytest.mark.parametrize("config", [FIXTURE, ROOT / "examples" / "quickstart.toml"],
                         ids=["fixture", "examples"])
def test_quickstart_fails_hospital_consortium_once_per_missing_control(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not config.exists():
        pytest.skip(f"{config} is not in this checkout")
    assert main(["check", str(config), "--threat-model", "hospital-consortium"]) == 1
    out = capsys.readouterr().out
    failed = [line.split()[1].rstrip(":") for line in out.splitlines()
              if line.startswith("FAIL")]
    assert failed == list(HOSPITAL_MISSING)
    assert "no DP: membership inference is in scope" in out
    assert "a simulation (securefl run) writes no audit log" in out
    assert "1 of 7 requirements pass" in out


def test_the_model_named_in_the_config_is_used_and_a_path_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(FIXTURE.read_text().replace(
        'name = "quickstart"', 'name = "quickstart"\nthreat_model = "byzantine-clients"'))
    assert main(["check", str(config)]) == 1
    assert "FAIL  robust-aggregation: fedavg averages" in capsys.readouterr().out
    model = ROOT / "threat_models" / "research-simulation.toml"
    assert main(["check", str(config), "--threat-model", str(model)]) == 0


def test_network_deployment_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(FIXTURE), "--threat-model", "research-simulation",
                 "--deployment", "network"]) == 1
    assert "FAIL  in-process-only" in capsys.readouterr().out
    assert main(["check", str(FIXTURE)]) == 2
    assert "no threat model" in capsys.readouterr().err
    assert main(["check", str(FIXTURE), "--threat-model", "no-such-model"]) == 2
    assert "unknown threat model 'no-such-model'" in capsys.readouterr().err
