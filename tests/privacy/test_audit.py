"""Empirical DP audit: the one-run and Clopper-Pearson statistics, canaries, and whole runs
that must never claim more leakage than the accountant allows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from securefl.attacks.audit import run_audit
from securefl.cli import main
from securefl.config import config_from_dict
from securefl.data import federate
from securefl.privacy.audit import (
    clopper_pearson_lower_bound,
    insert_canaries,
    one_run_lower_bound,
    one_run_p_value,
)

# small federations that memorise mislabelled canaries when nothing stops them
NON_PRIVATE = {"run": {"rounds": 10, "seed": 1},
               "data": {"dataset": "digits", "num_clients": 2, "partition": "iid"},
               "model": {"name": "mlp", "hidden": [512]},
               "client": {"epochs": 10, "batch_size": 16, "lr": 0.1}}


def _dp(epsilon: float, seed: int) -> dict:
    return {"run": {"rounds": 3, "seed": seed},
            "data": {"dataset": "digits", "num_clients": 2, "partition": "iid"},
            "model": {"name": "mlp", "hidden": [512]},
            "client": {"epochs": 2, "batch_size": 64, "lr": 0.5},
            "privacy": {"mode": "dp_sgd", "target_epsilon": epsilon, "max_grad_norm": 1.0}}




def test_p_value_without_delta_is_the_binomial_tail() -> None:
    p = 1 / (1 + math.exp(-2.0))
    value = one_run_p_value(num_canaries=100, num_guesses=40, num_correct=35, epsilon=2.0,
                            delta=0.0)
    assert value == pytest.approx(stats.binom.sf(34, 40, p))


def test_p_value_delta_term_matches_theorem() -> None:
    m, r, v, eps, delta = 1000, 60, 50, 1.0, 1e-4
    p = 1 / (1 + math.exp(-eps))
    alpha = max(sum(stats.binom.pmf(v - j, r, p) for j in range(1, i + 1)) / i
                for i in range(1, v + 1))
    expected = stats.binom.sf(v - 1, r, p) + 2 * m * delta * alpha
    assert one_run_p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps,
                           delta=delta) == pytest.approx(expected)


def test_p_value_grows_with_epsilon_and_refuses_nonsense() -> None:
    values = [one_run_p_value(num_canaries=200, num_guesses=100, num_correct=80, epsilon=e,
                              delta=1e-5) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < 1e-3 and values[-1] > 0.5
    with pytest.raises(ValueError, match="correct <= guesses"):
        one_run_p_value(num_canaries=10, num_guesses=20, num_correct=5, epsilon=1, delta=0)


def test_perfect_guesses_give_the_analytic_bound() -> None:
    # all r guesses right and delta = 0: p_eps^r = significance, eps = logit(significance^(1/r))
    included = np.r_[np.ones(50), np.zeros(50)].astype(bool)
    scores = included.astype(float) + np.linspace(0, 0.1, 100)
    bound = one_run_lower_bound(scores, included, delta=0.0, confidence=0.95,
                                guess_fractions=(1.0,))
    p = 0.05 ** (1 / 100)
    assert bound.num_guesses == 100 and bound.num_correct == 100
    assert bound.epsilon == pytest.approx(math.log(p / (1 - p)), rel=1e-6)


def test_random_scores_give_no_bound() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        included = rng.random(1000) < 0.5
        bound = one_run_lower_bound(rng.normal(size=1000), included, delta=1e-5)
        assert bound.epsilon < 0.3


def test_clopper_pearson_bound() -> None:
    # 20 held-out runs each side, separable: FPR+ = FNR+ = 1 - 0.025^(1/20)
    bound = clopper_pearson_lower_bound(np.ones(40), np.zeros(40), delta=0.0, confidence=0.95)
    upper = 1 - 0.025 ** (1 / 20)
    assert bound.epsilon == pytest.approx(math.log((1 - upper) / upper), rel=1e-6)
    rng = np.random.default_rng(1)
    chance = clopper_pearson_lower_bound(rng.normal(size=40), rng.normal(size=40), delta=1e-5)
    assert chance.epsilon == 0.0
    with pytest.raises(ValueError, match="at least 4 runs"):
        clopper_pearson_lower_bound(np.ones(2), np.zeros(40), delta=0.0)


def test_canaries_are_mislabelled_held_out_examples() -> None:
    config = config_from_dict(NON_PRIVATE)
    data = federate(config.data, seed=1)
    federation, canaries, included = insert_canaries(data, num_canaries=100,
                                                     rng=np.random.default_rng(0))
    assert len(canaries) == 100 and 30 < included.sum() < 70
    added = sum(len(c.train) for c in federation.clients.values()) - sum(
        len(c.train) for c in data.clients.values())
    assert added == included.sum()
    assert len(federation.test) == len(data.test) - 100
    test_rows = {r.tobytes() for r in data.test.features}
    assert all(r.tobytes() in test_rows for r in canaries.features)
    remaining = {r.tobytes() for r in federation.test.features}
    assert not any(r.tobytes() in remaining for r in canaries.features)
    true_labels = {r.tobytes(): y for r, y in zip(data.test.features, data.test.labels,
                                                   strict=True)}
    assert all(true_labels[r.tobytes()] != y for r, y in zip(canaries.features,
                                                              canaries.labels, strict=True))
    with pytest.raises(ValueError, match="num_canaries"):
        insert_canaries(data, num_canaries=len(data.test), rng=np.random.default_rng(0))


def test_non_private_training_is_audited_above_one() -> None:
    report = run_audit(config_from_dict(NON_PRIVATE), num_canaries=200)
    assert report.epsilon_lower_bound > 1.0
    assert math.isinf(report.accountant_epsilon)
    assert report.num_correct / report.num_guesses > 0.85
    assert report.test_accuracy > 0.8  # memorised canaries, still a useful model


@pytest.mark.parametrize(("epsilon", "seed"), [(1.0, 0), (4.0, 1), (8.0, 2)])
def test_dp_lower_bound_never_exceeds_the_accountant(epsilon: float, seed: int) -> None:
    report = run_audit(config_from_dict(_dp(epsilon, seed)), num_canaries=200)
    assert report.accountant_epsilon <= epsilon + 1e-9
    assert report.epsilon_lower_bound <= report.accountant_epsilon


def test_cli_writes_the_report(tmp_path, capsys) -> None:
    config = tmp_path / "audit.toml"
    config.write_text(
        '[run]\nrounds = 2\nseed = 0\n[data]\ndataset = "digits"\nnum_clients = 2\n'
        'partition = "iid"\n[model]\nname = "logistic"\n[client]\nepochs = 1\n'
        '[privacy]\nmode = "dp_sgd"\ntarget_epsilon = 2.0\n', encoding="utf-8")
    status = main(["privacy", "audit", str(config), "--out", str(tmp_path / "out"),
                   "--canaries", "50", "--seed", "3"])
    assert status == 0
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["num_canaries"] == 50
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"] <= 2.0
    assert "vs accountant epsilon" in capsys.readouterr().out
