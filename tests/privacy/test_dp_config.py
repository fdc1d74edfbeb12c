"""``[privacy]`` validation and build_privacy's checks: every bad input is a clear error."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from securefl.build import check_config
from securefl.config import Config, config_from_dict
from securefl.config.privacy import PrivacyConfig
from securefl.errors import ConfigError
from securefl.privacy import LEDGER_FILE, build_privacy
from securefl.privacy.accounting import PrivacyEvent, epsilon

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def config(**privacy: object) -> Config:
    return config_from_dict({"run": {"rounds": 4}, "data": {"num_clients": 3},
                             "client": {"batch_size": 10, "epochs": 1},
                             "privacy": privacy})


@pytest.mark.parametrize(("privacy", "message"), [
    ({"mode": "dp_sgd", "target_epsilon": 0.0}, "target_epsilon must be > 0, got 0.0"),
    ({"mode": "dp_sgd", "target_epsilon": -3.0}, "target_epsilon must be > 0"),
    ({"mode": "dp_sgd", "target_epsilon": 1.0, "delta": 0.0}, "delta must be in (0, 1)"),
    ({"mode": "dp_sgd"}, "target_epsilon or noise_multiplier must be set"),
    ({"mode": "dp_sgd", "target_epsilon": 1.0, "noise_multiplier": 1.0},
     "exactly one of them"),
    ({"mode": "dp_sgd", "noise_multiplier": 1.0, "adaptive_clipping": True},
     "adaptive_clipping applies to mode \"dp_fedavg\" only"),
    ({"mode": "dp_sgd", "noise_multiplier": 1.0, "grad_sample_mode": "magic"},
     "grad_sample_mode must be one of"),
    ({"mode": "dp_fedavg", "noise_multiplier": 1.0, "target_quantile": 1.0},
     "target_quantile must be in (0, 1)"),
    ({"mode": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 0}, "clip_norm must be > 0"),
    ({"mode": "dp_sgd", "noise_multiplier": 1.0, "accountant": "gdp"}, "accountant"),
    ({"mode": "dp_fedavg", "noise_multiplier": 1.0, "sampling": "secret",
      "secure_mode": False}, "\"secret\" needs secure_mode"),
    ({"mode": "dp_sgd", "noise_multiplier": 1.0, "participation_quantile": 0.999},
     "participation_quantile applies to modes"),
    ({"mode": "dp_fedavg", "noise_multiplier": 1.0, "sampling": "secret",
      "participation_quantile": 0.999}, "with sampling = \"public\""),
    ({"mode": "dp_fedavg", "noise_multiplier": 1.0, "participation_quantile": 1.0},
     "must be in (0, 1), got 1.0"),
])
def test_bad_privacy_tables_are_config_errors(privacy: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**privacy)
    assert "[privacy]" in str(caught.value) and message in str(caught.value)


def test_defaults_and_budget() -> None:
    assert PrivacyConfig().mode == "none"
    assert config().privacy.mode == "none"
    assert build_privacy(config(), run_dir=None, client_ids=["a"], num_examples={"a": 5}) is None
    assert config(mode="dp_sgd", target_epsilon=3.0).privacy.epsilon_budget == 3.0
    assert config(mode="dp_sgd", target_epsilon=3.0, budget=5.0).privacy.epsilon_budget == 5.0
    assert config(mode="dp_sgd", noise_multiplier=1.0).privacy.epsilon_budget is None


def test_delta_at_least_one_over_client_size_is_an_error() -> None:
    cfg = config(mode="dp_sgd", target_epsilon=3.0, delta=0.01)
    with pytest.raises(ConfigError, match=r"delta must be < 1 / \(examples of client 'b'\) "
                                          r"= 1/100"):
        build_privacy(cfg, run_dir=None, client_ids=["a", "b"],
                      num_examples={"a": 50, "b": 100})
    assert build_privacy(cfg, run_dir=None, client_ids=["a"], num_examples={"a": 99})


def test_delta_at_least_one_over_clients_is_an_error_for_user_level() -> None:
    cfg = config(mode="dp_fedavg", target_epsilon=3.0, delta=0.25)
    with pytest.raises(ConfigError, match=r"number of clients\) = 1/4"):
        build_privacy(cfg, run_dir=None, client_ids=list("abcd"), num_examples={})


def test_dp_sgd_calibrates_each_client_over_the_planned_run(tmp_path: Path) -> None:
    cfg = config(mode="dp_sgd", target_epsilon=2.0)
    setup = build_privacy(cfg, run_dir=tmp_path, client_ids=["a", "b"],
                          num_examples={"a": 40, "b": 200})
    assert setup is not None
    assert (tmp_path / LEDGER_FILE).is_file()
    # a: 4 batches/epoch -> q = 1/4, 4 rounds x 1 epoch x 4 = 16 steps; b: 20 batches
    assert setup.events["a"] == PrivacyEvent("dp_sgd", setup.noise_multipliers["a"], 0.25, 4)
    assert setup.events["b"] == PrivacyEvent("dp_sgd", setup.noise_multipliers["b"], 0.05, 20)
    for cid in ("a", "b"):
        spent = epsilon([setup.events[cid]] * 4, delta=1e-5)
        assert 2.0 - 0.011 <= spent <= 2.0
    assert setup.noise_multipliers["a"] > setup.noise_multipliers["b"]
    assert setup.ledger.budget("a") == 2.0
    setup.ledger.close()


def test_dp_fedavg_rate_is_clients_per_round_over_clients_under_a_secret_sample() -> None:
    cfg = config(mode="dp_fedavg", target_epsilon=5.0, sampling="secret").replace(
        server__clients_per_round=2)
    setup = build_privacy(cfg, run_dir=None, client_ids=[f"c{i}" for i in range(8)],
                          num_examples={})
    assert setup is not None
    event = setup.events["c0"]
    assert event.sample_rate == 0.25 and event.steps == 1 and event.mechanism == "dp_fedavg"
    assert 5.0 - 0.011 <= epsilon([event] * 4, delta=1e-5) <= 5.0
    assert len(setup.server_hooks) == 1 and setup.client_hooks == ()
    assert setup.secure and setup.sampling_seed is not None  # a CSPRNG sample and noise
    assert setup.server_hooks[0].source is not None
    fraction = config(mode="dp_fedavg", noise_multiplier=1.0, sampling="secret").replace(
        server__fraction=0.3)
    setup = build_privacy(fraction, run_dir=None, client_ids=[f"c{i}" for i in range(10)],
                          num_examples={})
    assert setup is not None and setup.events["c0"].sample_rate == 0.3


def test_dp_fedavg_under_a_public_sample_charges_q_1_per_round_taken_part() -> None:
    """4 rounds at q = 2/8: one expected participation, calibrated at q = 1."""
    cfg = config(mode="dp_fedavg", target_epsilon=5.0).replace(server__clients_per_round=2)
    setup = build_privacy(cfg, run_dir=None, client_ids=[f"c{i}" for i in range(8)],
                          num_examples={})
    assert setup is not None and setup.config.sampling == "public"
    event = setup.events["c0"]
    assert event.sample_rate == 1.0 and event.steps == 1
    assert 5.0 - 0.011 <= epsilon([event], delta=1e-5) <= 5.0
    assert setup.sampling_seed is None and not setup.secure  # seeded in simulation
    assert setup.server_hooks[0].charge_every_round is False
    with pytest.raises(ConfigError, match="simulations only"):
        build_privacy(cfg.replace(privacy__sampling="secret"), run_dir=None,
                      client_ids=[f"c{i}" for i in range(8)], num_examples={}, deployment=True)
    deployed = build_privacy(cfg, run_dir=None, client_ids=[f"c{i}" for i in range(8)],
                             num_examples={}, deployment=True)
    assert deployed is not None and deployed.secure


def test_dp_fedavg_under_a_public_sample_can_be_calibrated_for_a_quantile() -> None:
    """The same 4 rounds at q = 2/8 calibrated for the 0.99-quantile of Binomial(4, 1/4):
    P(K > 2) = 0.051, P(K > 3) = 0.0039 <= 0.01, so 3 rounds (the ledger pays all three)."""
    cfg = config(mode="dp_fedavg", target_epsilon=5.0, participation_quantile=0.99).replace(
        server__clients_per_round=2)
    setup = build_privacy(cfg, run_dir=None, client_ids=[f"c{i}" for i in range(8)],
                          num_examples={})
    assert setup is not None
    event = setup.events["c0"]
    assert event.sample_rate == 1.0 and event.steps == 1
    three = dataclasses.replace(event, steps=3)
    assert 5.0 - 0.011 <= epsilon([three], delta=1e-5) <= 5.0


def test_dp_fedavg_needs_a_linear_rule() -> None:
    cfg = config(mode="dp_fedavg", noise_multiplier=1.0).replace(
        aggregation=config_from_dict({"aggregation": {"rule": "median"}}).aggregation)
    with pytest.raises(ConfigError, match="needs a linear rule"):
        check_config(cfg)


def test_adaptive_clipping_with_too_few_clients_is_explained() -> None:
    cfg = config(mode="dp_fedavg", noise_multiplier=2.0, adaptive_clipping=True)
    with pytest.raises(ConfigError, match="sample more clients per round"):
        build_privacy(cfg, run_dir=None, client_ids=list("abcd"), num_examples={})


def test_unreachable_target_is_explained() -> None:
    cfg = config(mode="dp_sgd", target_epsilon=1e-9)
    with pytest.raises(ConfigError, match="cannot be reached"):
        build_privacy(cfg, run_dir=None, client_ids=["a"], num_examples={"a": 1000})


def test_wrap_trainer_builds_once_per_client() -> None:
    cfg = config(mode="dp_fedavg", noise_multiplier=1.0)
    setup = build_privacy(cfg, run_dir=None, client_ids=list("abcd"), num_examples={})
    assert setup is not None
    base = object()
    first = setup.wrap_trainer("a", base)
    assert setup.wrap_trainer("a", base) is first
    with pytest.raises(ValueError, match="already wrapped around another trainer"):
        setup.wrap_trainer("a", object())
    with pytest.raises(ValueError, match="unknown client 'z'"):
        setup.wrap_trainer("z", base)


@pytest.mark.parametrize("name", ["dp_sgd.toml", "dp_fedavg.toml"])
def test_examples_load(name: str) -> None:
    from securefl.config import load_config

    cfg = load_config(EXAMPLES / name)
    assert cfg.privacy.mode == name.removesuffix(".toml")
    assert cfg.privacy.target_epsilon == 8.0 and cfg.privacy.delta == 1e-5
    assert math.isfinite(cfg.privacy.clip_norm)
