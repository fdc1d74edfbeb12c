"""User-level audit of DP-FedAvg with canary clients (Andrew et al., ICLR 2024) and its gate:
planted DP bugs (here, never in the library) must make the gate fail; the correct pipeline must
pass; the bound must agree with the one-run theorem evaluated independently; the Gaussian-fit
estimate must match the Gaussian mechanism's exact ε."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import stats

from securefl.attacks.audit_user import (
    USER_GUESS_FRACTIONS,
    CanaryClients,
    gaussian_epsilon,
    run_user_audit,
)
from securefl.cli import main
from securefl.config import clients_per_round, config_from_dict
from securefl.engine.server import Sampler
from securefl.privacy.audit import gate_fails, one_run_lower_bound
from securefl.privacy.dp_fedavg import UserLevelNoise

CLAIMED = 1.0
CANARIES = 5000
CLIENTS, PER_ROUND = 20, 4  # q = 0.2; four times that is still below 1


def _config(sampling: str = "secret", **privacy: Any) -> Any:
    return config_from_dict({
        "run": {"rounds": 10, "seed": 0},
        "data": {"dataset": "digits", "num_clients": CLIENTS, "partition": "iid"},
        "model": {"name": "mlp", "hidden": [32]},
        "client": {"epochs": 1, "batch_size": 8, "lr": 0.1},
        "server": {"clients_per_round": PER_ROUND},
        "privacy": {"mode": "dp_fedavg", "target_epsilon": CLAIMED, "sampling": sampling,
                    "adaptive_clipping": True, "clipped_count_stddev": 5.0, **privacy}})


# planted bugs: each changes what the pipeline really does, not what its accountant is told
def _noise(simulation: Any) -> UserLevelNoise:
    return next(h for h in simulation.server.hooks if isinstance(h, UserLevelNoise))


def _noise_off(simulation: Any, _canaries: CanaryClients) -> None:
    noise = _noise(simulation)
    noise.update_noise_multiplier = 0.0
    noise.clip.count_stddev = 0.0


def _tenth_sigma(simulation: Any, _canaries: CanaryClients) -> None:
    noise = _noise(simulation)
    noise.update_noise_multiplier /= 10
    noise.clip.count_stddev /= 10


class _Unbounded:
    """A client's clipping state with the bound gone (the server still noises for C)."""

    clip_norm = math.inf

    def __init__(self, base: Any) -> None:
        self.base = base

    def record(self, round: int, client_id: str, unclipped: bool) -> None:
        self.base.record(round, client_id, unclipped)


def _no_clipping(simulation: Any, canaries: CanaryClients) -> None:
    for client in [*simulation.trainers.values(), canaries]:  # real clients and canaries
        client.clip = _Unbounded(client.clip)


def _four_times_rate(simulation: Any, _canaries: CanaryClients) -> None:
    server = simulation.server
    available = len(server.transport.client_ids())
    told = clients_per_round(available, count=server.sampler.count,
                             fraction=server.sampler.fraction)
    server.sampler = Sampler(count=min(available, 4 * told))


BUGS: dict[str, Callable[[Any, CanaryClients], None]] = {
    "noise_off": _noise_off, "tenth_sigma": _tenth_sigma, "no_clipping": _no_clipping,
    "four_times_rate": _four_times_rate}


def test_correct_pipeline_passes_the_gate() -> None:
    report, scores, included = run_user_audit(_config(), num_canaries=CANARIES)
    assert report.canary == "client" and report.num_canaries == CANARIES
    assert report.accountant_epsilon <= CLAIMED + 1e-9
    assert not gate_fails(report)
    assert 2400 < included.sum() < 2600 and np.all(np.abs(scores) <= 1)
    assert report.epsilon_estimate is not None and report.epsilon_estimate < 2 * CLAIMED


@pytest.mark.parametrize("bug", ["noise_off", "tenth_sigma", "no_clipping"])
def test_planted_bug_fails_the_gate(bug: str, theorem_p_value) -> None:
    report, scores, included = run_user_audit(_config(), num_canaries=CANARIES, tamper=BUGS[bug])
    assert report.accountant_epsilon <= CLAIMED + 1e-9  # the accountant does not see the bug
    assert gate_fails(report), report
    assert report.epsilon_estimate is not None and report.epsilon_estimate > 2 * CLAIMED
    # the bound agrees with the one-run theorem evaluated independently on the same scores:
    # eps-hat is rejected at every guess count, eps-hat + 2e-4 is not
    significance = 0.05 / len(USER_GUESS_FRACTIONS)
    bound = one_run_lower_bound(scores, included, delta=1e-5, confidence=0.95,
                                guess_fractions=USER_GUESS_FRACTIONS)
    assert bound.epsilon == pytest.approx(report.epsilon_lower_bound)
    assert theorem_p_value(scores, included, eps=bound.epsilon, delta=1e-5,
                           fractions=USER_GUESS_FRACTIONS) < significance * (1 + 1e-9)
    assert theorem_p_value(scores, included, eps=bound.epsilon + 2e-4, delta=1e-5,
                           fractions=USER_GUESS_FRACTIONS) >= significance


def test_four_times_the_sampling_rate_is_seen() -> None:
    """At user level and a claimed epsilon of 1 the 4x-rate bug sits at the edge of what one
    run can show: at this size its bound fell between 0.9 and 1.5 over the seeds measured, so
    whether the gate fails is the benchmark's catch rate over seeds, not a one-seed test.  What
    one seed does show reliably: the Gaussian-fit estimate is well above the claim (2.5 to 3.0
    measured, against at most 1.03 for the correct pipeline)."""
    rates: list[int] = []

    def tamper(simulation: Any, canaries: CanaryClients) -> None:
        BUGS["four_times_rate"](simulation, canaries)
        rates.append(simulation.server.sampler.count or 0)

    report, _, _ = run_user_audit(_config(), num_canaries=CANARIES, tamper=tamper)
    assert rates == [4 * PER_ROUND] and 4 * PER_ROUND < CLIENTS  # 4q, still below 1
    assert report.accountant_epsilon <= CLAIMED + 1e-9
    assert report.epsilon_estimate is not None and report.epsilon_estimate > 2 * CLAIMED
    assert report.epsilon_lower_bound > 0.5 * CLAIMED


def test_public_sampling_caps_canaries_at_the_budget() -> None:
    report, _, _ = run_user_audit(_config("public"), num_canaries=2000)
    # q = 1 per round taken part in, calibrated for ceil(0.2 * 3) = 1 round: a canary (like a
    # client) takes part at most once, so the compared epsilon stays the claimed one
    assert report.accountant_epsilon == pytest.approx(CLAIMED, abs=0.01)
    assert not gate_fails(report)


def test_packed_canaries_are_unit_sign_directions() -> None:
    rng = np.random.default_rng(1)
    dimension, count = 37, 11  # 37 coordinates: the last byte is padded
    signs = np.frombuffer(rng.bytes(count * 5), dtype=np.uint8).reshape(count, 5).copy()
    canaries = CanaryClients(signs, dimension=dimension, included=np.ones(count, dtype=bool),
                             factor=10.0, rng=rng)
    units = canaries.directions(np.arange(count))
    assert np.allclose(np.abs(units), 1 / math.sqrt(dimension))
    assert np.allclose(np.linalg.norm(units, axis=1), 1.0)
    some = np.array([1, 4, 5])  # the set-bit count gives the sum of their directions
    summed = (2.0 * canaries.set_bits(some) - len(some)) / math.sqrt(dimension)
    assert np.allclose(summed, units[some].sum(axis=0))
    vector = rng.normal(size=dimension)
    assert np.allclose(canaries.cosines(vector), units @ vector / np.linalg.norm(vector))
    with pytest.raises(ValueError, match="packed row"):
        CanaryClients(signs[:, :4], dimension=dimension, included=np.ones(count, dtype=bool),
                      factor=10.0, rng=rng)


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_gaussian_fit_epsilon_is_the_gaussian_mechanisms(mu: float) -> None:
    # equal variances: mu-GDP, delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    # (Dong, Roth & Su 2022, Cor. 2.13)
    eps = gaussian_epsilon(0.0, 2.0, 2.0 * mu, 2.0, delta=1e-5)
    exact = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert exact == pytest.approx(1e-5, rel=1e-3)
    assert gaussian_epsilon(0.0, 1.0, 0.0, 1.0, delta=1e-5) == 0.0
    assert math.isinf(gaussian_epsilon(0.0, 0.0, 1.0, 1.0, delta=1e-5))


def _write(tmp_path, privacy: str) -> str:
    path = tmp_path / "audit.toml"
    path.write_text(
        f'[run]\nrounds = 2\nseed = 0\n[data]\ndataset = "digits"\nnum_clients = {CLIENTS}\n'
        f'partition = "iid"\n[model]\nname = "mlp"\nhidden = [16]\n[client]\nepochs = 1\n'
        f'[server]\nclients_per_round = {PER_ROUND}\n' + privacy, encoding="utf-8")
    return str(path)


def test_cli_picks_canary_clients_for_dp_fedavg(tmp_path, capsys) -> None:
    config = _write(tmp_path, '[privacy]\nmode = "dp_fedavg"\ntarget_epsilon = 1.0\n')
    status = main(["privacy", "audit", config, "--gate", "--out", str(tmp_path / "out"),
                   "--canaries", "1000"])
    assert status == 0
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["canary"] == "client" and report["gate"] == "pass"
    assert report["num_canaries"] == 1000 and report["epsilon_estimate"] >= 0
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"] <= 1.0
    assert (tmp_path / "out" / "audit-scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "estimate" in capsys.readouterr().out


def test_cli_refuses_canary_clients_for_dp_sgd(tmp_path) -> None:
    config = _write(tmp_path, '[privacy]\nmode = "dp_sgd"\ntarget_epsilon = 1.0\n')
    assert main(["privacy", "audit", config, "--canary", "client", "--out",
                 str(tmp_path)]) == 2
