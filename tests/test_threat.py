"""Threat models against configs: for each model one config that passes, and for each of its
requirements a config that fails it (with exactly the failures expected)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from securefl.config import Config, load_config
from securefl.errors import ConfigError
from securefl.threat import available_threat_models, check_config, load_threat_model, require

FIXTURES = Path(__file__).parent / "threat_configs"
MODELS = ("honest-but-curious-server", "byzantine-clients", "curious-server-and-byzantine-clients",
          "hospital-consortium", "research-simulation")
PASSING = {m: FIXTURES / f"{m}.toml" for m in MODELS}
PASSING["research-simulation"] = FIXTURES / "quickstart.toml"


#: hospital-consortium is a networked deployment: its signed audit log exists only there
DEPLOYMENT = {"hospital-consortium": "network"}


def failures(config: Config, model: str, **kwargs: Any) -> set[str]:
    kwargs.setdefault("deployment", DEPLOYMENT.get(model, "simulation"))
    return {r.id for r in check_config(config, model, **kwargs) if not r.passed}


def with_he_server_key(config: Config) -> Config:
    """HE whose secret key sits on the server (securefl's own HE never allows this)."""
    he = SimpleNamespace(**vars(config.protection.he), server_holds_secret_key=True)
    return config.replace(protection=dataclasses.replace(config.protection, kind="he", he=he))


def aggregation(config: Config, rule: str, **options: Any) -> Config:
    return config.replace(aggregation=dataclasses.replace(config.aggregation, rule=rule,
                                                          options=options))


def test_every_shipped_model_is_here_and_complete() -> None:
    assert set(available_threat_models()) == set(MODELS)
    readme = (Path(__file__).parents[1] / "threat_models" / "README.md").read_text()
    for name in MODELS:
        model = load_threat_model(name)
        assert model.name == name
        assert model.trusted and model.adversaries and model.requirements
        assert name in readme


@pytest.mark.parametrize("model", MODELS)
def test_the_passing_config_passes_every_requirement(model: str) -> None:
    results = check_config(load_config(PASSING[model]), model,
                           deployment=DEPLOYMENT.get(model, "simulation"))
    assert [r.id for r in results] == [r.id for r in load_threat_model(model).requirements]
    assert all(r.passed for r in results), [r.line() for r in results if not r.passed]


def _breakers() -> list[tuple[str, str, Any, set[str]]]:
    """(model, requirement, config change, every requirement expected to fail)."""
    hbc, byz = "honest-but-curious-server", "byzantine-clients"
    both, hosp = "curious-server-and-byzantine-clients", "hospital-consortium"
    return [
        (hbc, "hide-individual-updates", lambda c: c.replace(protection__kind="plain"),
         {"hide-individual-updates"}),
        (hbc, "hide-individual-updates", lambda c: c.replace(
            protection__kind="he", protection__he=dataclasses.replace(c.protection.he,
                                                                      layers=("0.*",))),
         {"hide-individual-updates"}),
        (hbc, "he-key-separation", with_he_server_key, {"he-key-separation"}),
        (hbc, "client-side-dp", lambda c: c.replace(privacy__mode="none"), {"client-side-dp"}),
        (hbc, "client-side-dp", lambda c: c.replace(privacy__mode="dp_fedavg"),
         {"client-side-dp"}),
        (hbc, "encrypted-transport", lambda c: c.replace(network__insecure=True),
         {"encrypted-transport"}),
        (byz, "robust-aggregation", lambda c: aggregation(c, "fedavg"), {"robust-aggregation"}),
        (byz, "robust-aggregation", lambda c: aggregation(c, "krum", num_byzantine=1),
         {"robust-aggregation"}),
        (byz, "robust-aggregation", lambda c: aggregation(c, "trimmed_mean", beta=0.1),
         {"robust-aggregation"}),
        (byz, "robust-aggregation", lambda c: c.replace(server__clients_per_round=6),
         {"robust-aggregation"}),
        (byz, "robust-aggregation", lambda c: c.replace(protection__kind="secagg"),
         {"robust-aggregation"}),
        (both, "robust-aggregation", lambda c: aggregation(c, "fedavg"), {"robust-aggregation"}),
        (both, "protect-individual-updates",
         lambda c: c.replace(privacy__mode="dp_fedavg"), {"protect-individual-updates"}),
        (both, "per-client-budget", lambda c: c.replace(privacy__target_epsilon=20.0),
         {"per-client-budget"}),
        (both, "collusion", lambda c: aggregation(c, "fedavg").replace(protection__kind="he"),
         {"robust-aggregation", "collusion"}),
        (both, "collusion", lambda c: aggregation(c, "fedavg").replace(
            protection__kind="secagg", protection__secagg=dataclasses.replace(
                c.protection.secagg, neighbours=2)), {"robust-aggregation", "collusion"}),
        (both, "encrypted-transport", lambda c: c.replace(network__insecure=True,
                                                          network__address="127.0.0.1:9"),
         {"encrypted-transport"}),
        (hosp, "mutual-tls", lambda c: c.replace(network__certs=None), {"mutual-tls"}),
        (hosp, "authenticated-sites", lambda c: c.replace(network__allowlist={}),
         {"authenticated-sites"}),
        (hosp, "differential-privacy", lambda c: c.replace(privacy__mode="none"),
         {"differential-privacy", "per-site-budget"}),
        (hosp, "per-site-budget", lambda c: c.replace(privacy__target_epsilon=20.0),
         {"per-site-budget"}),
        (hosp, "per-site-budget", lambda c: c.replace(privacy__delta=1e-3), {"per-site-budget"}),
        (hosp, "per-site-budget", lambda c: c.replace(privacy__target_epsilon=None),
         {"per-site-budget"}),
        (hosp, "hide-site-updates", lambda c: c.replace(protection__kind="plain"),
         {"hide-site-updates"}),
        (hosp, "he-key-separation", with_he_server_key, {"he-key-separation"}),
        (hosp, "signed-audit-log", lambda c: c.replace(network__audit=False),
         {"signed-audit-log"}),
        ("research-simulation", "coherent-configuration",
         lambda c: aggregation(c, "krum", num_byzantine=2).replace(protection__kind="secagg"),
         {"coherent-configuration"}),
    ]


@pytest.mark.parametrize(("model", "requirement", "change", "expected"), _breakers(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_requirement_has_a_config_that_fails_it(model: str, requirement: str, change: Any,
                                                     expected: set[str]) -> None:
    assert requirement in expected
    assert failures(change(load_config(PASSING[model])), model) == expected


def test_every_requirement_of_every_model_is_broken_by_some_config() -> None:
    covered = {(m, r) for m, r, _, _ in _breakers()} | {("research-simulation",
                                                           "in-process-only")}
    wanted = {(m, r.id) for m in MODELS for r in load_threat_model(m).requirements}
    assert wanted == covered


@pytest.mark.parametrize("model", ["honest-but-curious-server", "hospital-consortium"])
def test_he_with_every_layer_encrypted_hides_updates_like_secure_aggregation(model: str) -> None:
    config = load_config(PASSING[model])
    assert failures(config.replace(protection__kind="he"), model) == set()


def test_research_simulation_refuses_a_network_deployment() -> None:
    config = load_config(PASSING["research-simulation"])
    assert failures(config, "research-simulation") == set()
    assert failures(config, "research-simulation", deployment="network") == {"in-process-only"}
    with pytest.raises(ValueError, match="deployment must be one of"):
        check_config(config, "research-simulation", deployment="cloud")


def test_failure_reasons_say_what_is_wrong() -> None:
    quick = load_config(FIXTURES / "quickstart.toml")
    krum = aggregation(quick, "krum", num_byzantine=2)
    reasons = {r.id: r.reason for r in check_config(krum, "honest-but-curious-server")}
    assert reasons["hide-individual-updates"] == (
        "robust aggregation (krum) needs plaintext updates; this threat model requires "
        "secure aggregation or HE")
    assert reasons["client-side-dp"] == "no DP: membership inference is in scope"
    he = with_he_server_key(load_config(PASSING["honest-but-curious-server"]))
    reasons = {r.id: r.reason for r in check_config(he, "honest-but-curious-server")}
    assert reasons["he-key-separation"] == (
        "HE with the secret key on the server violates honest-but-curious-server")
    byz = {r.id: r.reason for r in check_config(quick, "byzantine-clients")}
    assert "fedavg averages the updates" in byz["robust-aggregation"]
    assert "withstands 2 byzantine clients" in byz["robust-aggregation"]


def test_require_is_silent_without_a_threat_model_and_lists_every_failure() -> None:
    quick = load_config(FIXTURES / "quickstart.toml")
    assert require(quick) == []
    assert [r.passed for r in require(quick.replace(run__threat_model="research-simulation"))] \
        == [True, True]
    with pytest.raises(ConfigError) as info:
        require(quick.replace(run__threat_model="hospital-consortium"))
    message = str(info.value)
    assert "6 of 7 requirements fail" in message
    for rid in ("mutual-tls", "authenticated-sites", "differential-privacy", "per-site-budget",
                "hide-site-updates", "signed-audit-log"):
        assert f"FAIL  {rid}:" in message
    assert "he-key-separation" not in message
    with pytest.raises(ConfigError, match="in-process-only"):
        require(quick.replace(run__threat_model="research-simulation"), deployment="network")


def test_securefl_run_refuses_to_start_when_the_check_fails(tmp_path: Path) -> None:
    from securefl.simulation import run_simulation

    quick = load_config(FIXTURES / "quickstart.toml")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="hide-site-updates"):
        run_simulation(quick.replace(run__threat_model="hospital-consortium"), out_dir=out)
    assert not out.exists()


def test_a_threat_model_can_be_given_by_path(tmp_path: Path) -> None:
    source = (Path(__file__).parents[1] / "threat_models" / "byzantine-clients.toml").read_text()
    path = tmp_path / "strict.toml"
    path.write_text(source.replace("max_fraction = 0.2", "max_fraction = 0.45")
                    .replace('name = "byzantine-clients"', 'name = "strict"'))
    config = load_config(PASSING["byzantine-clients"])
    assert failures(config, "byzantine-clients") == set()
    results = check_config(config, str(path))
    assert not results[0].passed
    assert "needs a rule that withstands 4 byzantine clients" in results[0].reason
    assert failures(aggregation(config, "median"), str(path)) == set()
