"""White-box gradient-canary audit and its gate: planted DP bugs (in the test, never in the
library) must make the gate fail; the correct pipeline must pass; the one-run bound must agree
with the theorem evaluated independently on the same scores."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from securefl.attacks.audit_gradient import draw_canaries, run_gradient_audit
from securefl.cli import main
from securefl.config import config_from_dict
from securefl.privacy.audit import gate_fails, one_run_lower_bound

CLAIMED = 1.0
CANARIES = 2000  # of the 4810 coordinates of the 64-unit MLP


def _config(epsilon: float | None = CLAIMED) -> Any:
    table: dict[str, Any] = {
        "run": {"rounds": 2, "seed": 0},
        "data": {"dataset": "digits", "num_clients": 2, "partition": "iid"},
        "model": {"name": "mlp", "hidden": [64]},
        "client": {"epochs": 2, "batch_size": 16, "lr": 0.1}}
    if epsilon is not None:
        table["privacy"] = {"mode": "dp_sgd", "target_epsilon": epsilon, "max_grad_norm": 1.0}
    return config_from_dict(table)


# planted bugs: each changes what the client really does, not what its accountant is told
def _noise_off(_cid: str, trainer: Any) -> None:
    trainer.optimizer.noise_multiplier = 0.0


def _tenth_sigma(_cid: str, trainer: Any) -> None:
    trainer.optimizer.noise_multiplier /= 10


def _no_clipping(_cid: str, trainer: Any) -> None:
    optimizer = trainer.optimizer  # the same noise std sigma C, but no clipping
    optimizer.noise_multiplier *= optimizer.max_grad_norm / 1e6
    optimizer.max_grad_norm = 1e6


def _four_times_rate(_cid: str, trainer: Any) -> None:
    sampler = trainer.loader.batch_sampler  # 4 q, at most 1 (a client with q = 1/4 in the
    sampler.sample_rate = min(1.0, 4 * sampler.sample_rate)  # Dirichlet split samples all)


BUGS: dict[str, Callable[[str, Any], None]] = {
    "noise_off": _noise_off, "tenth_sigma": _tenth_sigma, "no_clipping": _no_clipping,
    "four_times_rate": _four_times_rate}


def test_correct_pipeline_passes_the_gate() -> None:
    report, scores, included = run_gradient_audit(_config(), num_canaries=CANARIES)
    assert report.accountant_epsilon <= CLAIMED + 1e-9
    assert not gate_fails(report)
    assert report.epsilon_lower_bound <= report.accountant_epsilon
    assert len(scores) == CANARIES and 900 < included.sum() < 1100


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_fails_the_gate(bug: str) -> None:
    rates: list[tuple[float, float]] = []  # (sampled, accounted) per client

    def tamper(cid: str, trainer: Any) -> None:
        BUGS[bug](cid, trainer)
        rates.append((trainer.loader.batch_sampler.sample_rate, trainer.sample_rate))

    report, _, _ = run_gradient_audit(_config(), num_canaries=CANARIES, tamper=tamper)
    if bug == "four_times_rate":  # still below 1 here: exactly four times the accounted rate
        assert len(rates) == 2 and all(real == pytest.approx(4 * told) and real < 1
                                       for real, told in rates)
    assert report.accountant_epsilon <= CLAIMED + 1e-9  # the accountant does not see the bug
    assert gate_fails(report), report


def test_non_private_run_is_bounded_above_two() -> None:
    report, _, _ = run_gradient_audit(_config(None), num_canaries=CANARIES)
    assert math.isinf(report.accountant_epsilon) and not gate_fails(report)
    assert report.epsilon_lower_bound >= 2.0
    assert report.epsilon_lower_bound > 4.0 and report.num_correct >= 0.99 * report.num_guesses


@pytest.mark.parametrize("bug", ["tenth_sigma", "four_times_rate"])
def test_one_run_bound_agrees_with_the_theorem(bug: str, theorem_p_value) -> None:
    report, scores, included = run_gradient_audit(_config(), num_canaries=CANARIES,
                                                  tamper=BUGS[bug])
    fractions = (0.05, 0.1, 0.2, 0.3, 0.5)
    significance = 0.05 / len(fractions)  # Bonferroni over the guess counts
    bound = one_run_lower_bound(scores, included, delta=1e-5, confidence=0.95,
                                guess_fractions=fractions)
    assert bound.epsilon == pytest.approx(report.epsilon_lower_bound) and bound.epsilon > 1
    # eps-hat is rejected by the theorem, and eps-hat + 2e-4 is not, at any guess count
    assert theorem_p_value(scores, included, eps=bound.epsilon, delta=1e-5,
                            fractions=fractions) < significance * (1 + 1e-9)
    assert theorem_p_value(scores, included, eps=bound.epsilon + 2e-4, delta=1e-5,
                            fractions=fractions) >= significance


def test_canaries_take_the_quietest_distinct_coordinates() -> None:
    activity = np.r_[np.zeros(10), np.arange(1, 91, dtype=float)]
    canaries = draw_canaries(activity=activity, num_clients=3, num_canaries=20, norm=10.0,
                             rng=np.random.default_rng(0))
    assert np.array_equal(canaries.coordinates, np.arange(20))
    assert set(canaries.owners.tolist()) <= {0, 1, 2} and canaries.norm == 10.0
    with pytest.raises(ValueError, match="num_canaries"):
        draw_canaries(activity=activity, num_clients=1, num_canaries=101, norm=1.0,
                      rng=np.random.default_rng(0))


def _write(tmp_path, privacy: str) -> str:
    path = tmp_path / "audit.toml"
    path.write_text(
        '[run]\nrounds = 2\nseed = 0\n[data]\ndataset = "digits"\nnum_clients = 2\n'
        'partition = "iid"\n[model]\nname = "mlp"\nhidden = [32]\n[client]\nepochs = 2\n'
        + privacy, encoding="utf-8")
    return str(path)


def test_cli_gate_passes_a_correct_run_and_writes_report_and_plot(tmp_path, capsys) -> None:
    config = _write(tmp_path, '[privacy]\nmode = "dp_sgd"\ntarget_epsilon = 1.0\n')
    status = main(["privacy", "audit", config, "--gate", "--out", str(tmp_path / "out"),
                   "--canaries", "500"])
    assert status == 0
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["canary"] == "gradient" and report["gate"] == "pass"
    assert report["num_canaries"] == 500
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"] <= 1.0
    assert (tmp_path / "out" / "audit-scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "vs accountant epsilon" in capsys.readouterr().out


def test_cli_refuses_gradient_canaries_for_dp_fedavg(tmp_path) -> None:
    config = _write(tmp_path, '[privacy]\nmode = "dp_fedavg"\ntarget_epsilon = 1.0\n')
    assert main(["privacy", "audit", config, "--canary", "gradient", "--gate", "--out",
                 str(tmp_path)]) == 2
