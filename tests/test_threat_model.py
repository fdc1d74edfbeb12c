"""Threat-model files: strict parsing, and the numbers the controls compute."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from securefl.config import Config, ServerConfig
from securefl.config.secagg import SecAggConfig
from securefl.errors import ConfigError
from securefl.threat.controls import byzantine_tolerance, collusion
from securefl.threat.facts import facts
from securefl.threat.model import load_threat_model, parse_threat_model

SHIPPED = Path(__file__).parents[1] / "threat_models" / "byzantine-clients.toml"


def table() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update(colour="red"), "colour is not a known key"),
    (lambda t: t["requirements"][0].update(control="magic"), "control must be one of"),
    (lambda t: t["requirements"][0].update(accept=["he"]), "accept is not a known key"),
    (lambda t: t["requirements"].append(dict(t["requirements"][0])), "appears twice"),
    (lambda t: t["adversaries"][0].update(behaviour="sneaky"), "behaviour must be one of"),
    (lambda t: t["adversaries"][0].update(max_fraction=1.5), "max_fraction must be"),
    (lambda t: t["adversaries"][0].update(max_count=-1), "max_count must be an integer"),
    (lambda t: t.update(requirements=[]), "at least one [[requirements]]"),
    (lambda t: t.pop("title"), "title is required"),
    (lambda t: t["requirements"].append({"id": "x", "control": "privacy_budget",
                                         "because": "b", "max_epsilon": 1.0}),
     "needs parameter max_delta"),
    (lambda t: t["requirements"].append({"id": "x", "control": "update_secrecy",
                                         "because": "b", "accept": ["rot13"]}),
     "accept must be a non-empty list drawn from secagg, he, dp_sgd"),
])
def test_bad_threat_models_are_refused(edit: Any, message: str) -> None:
    raw = table()
    edit(raw)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_threat_model(raw, source="m.toml")


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_threat_model(bad)
    with pytest.raises(ConfigError, match="no such threat model file"):
        load_threat_model(tmp_path / "missing.toml")


def test_byzantine_count_follows_the_round_size() -> None:
    model = load_threat_model("byzantine-clients")
    assert [model.max_byzantine(n) for n in (4, 5, 9, 10, 50)] == [0, 1, 1, 2, 10]
    both = load_threat_model("curious-server-and-byzantine-clients")
    assert both.max_colluding(10) == 2 and both.max_colluding(50) == 10
    assert load_threat_model("hospital-consortium").max_colluding(50) == 0


@pytest.mark.parametrize(("rule", "options", "n", "f"), [
    ("krum", {"num_byzantine": 2}, 7, 2), ("krum", {"num_byzantine": 2}, 6, 0),
    ("multikrum", {"num_byzantine": 3}, 9, 3), ("bulyan", {"num_byzantine": 1}, 7, 1),
    ("bulyan", {"num_byzantine": 1}, 6, 0), ("median", {}, 10, 4), ("median", {}, 11, 5),
    ("geometric_median", {}, 10, 4), ("trimmed_mean", {"beta": 0.2}, 10, 2),
    ("trimmed_mean", {}, 10, 1), ("fedavg", {}, 10, 0), ("norm_bound", {"max_norm": 1}, 10, 0),
    ("centered_clipping", {"tau": 1.0}, 20, 2),
    ("nnm", {"num_byzantine": 2, "inner": "krum"}, 7, 2),
    ("nnm", {"num_byzantine": 3, "inner": "krum"}, 7, 0),        # n > 2f holds, Krum's n > 8 not
    ("nnm", {"num_byzantine": 2, "inner": {"rule": "trimmed_mean", "beta": 0.1}}, 10, 1),
    ("nnm", {"num_byzantine": 5, "inner": "median"}, 10, 0),     # n > 2f fails
    ("someone_elses_rule", {}, 10, 0), ("someone_elses_rule", {"num_byzantine": 3}, 10, 3),
])
def test_byzantine_tolerance_follows_each_rules_precondition(rule: str, options: dict[str, Any],
                                                             n: int, f: int) -> None:
    assert byzantine_tolerance(rule, options, n)[0] == f


@pytest.mark.parametrize(("server", "expected"), [
    (ServerConfig(), 10), (ServerConfig(fraction=0.5), 5), (ServerConfig(clients_per_round=3), 3),
    (ServerConfig(fraction=0.25), 3), (ServerConfig(clients_per_round=40), 10),
])
def test_clients_per_round(server: ServerConfig, expected: int) -> None:
    assert facts(Config(server=server)).clients_per_round == expected


@pytest.mark.parametrize(("clients", "neighbours", "threshold", "passed", "shares"), [
    (10, "auto", 0.5, True, "5 of 9"),    # k = min(9, 2 ceil(1.5 log2 10)) = 9, 4 + 1; f = 2
    (50, "auto", 0.5, False, "10 of 18"),  # k = 2 ceil(1.5 log2 50) = 18, 9 + 1; f = 10
    (50, "auto", 0.6, True, "11 of 18"),   # floor(0.6 * 18) + 1 = 11 > 10 colluders
    (10, 2, 0.5, False, "2 of 2"),         # k = 2, 1 + 1 shares <= f = 2
])
def test_secagg_collusion_threshold(clients: int, neighbours: Any, threshold: float,
                                    passed: bool, shares: str) -> None:
    secagg = SecAggConfig(neighbours=neighbours, threshold=threshold)
    config = Config().replace(data__num_clients=clients, protection__kind="secagg",
                              protection__secagg=secagg)
    ok, reason = collusion(facts(config), load_threat_model("curious-server-and-byzantine-clients"))
    assert ok is passed
    assert shares in reason


def test_an_installed_wheel_finds_its_threat_models(tmp_path, monkeypatch) -> None:
    import sys

    from securefl.threat import model

    repo = Path(__file__).parents[1]
    data_files = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"]
    assert data_files == {"share/securefl/threat_models": ["threat_models/*.toml"]}
    installed = tmp_path / "prefix" / "share" / "securefl" / "threat_models"
    installed.mkdir(parents=True)
    (installed / "byzantine-clients.toml").write_text(SHIPPED.read_text())
    assert model.threat_model_dir() == repo / "threat_models"  # a checkout wins
    # site-packages/securefl/threat/model.py: no threat_models/ beside the package
    monkeypatch.setattr(model, "__file__", str(tmp_path / "site" / "securefl" / "threat" / "m.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert model.threat_model_dir() == installed
    assert model.available_threat_models() == ["byzantine-clients"]
    assert load_threat_model("byzantine-clients").name == "byzantine-clients"
