"""Accounting equals Opacus's accountants, and composing per round equals one run."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from securefl.errors import ConfigError
from securefl.privacy.accounting import PrivacyEvent, compose, epsilon
from securefl.privacy.calibration import EPSILON_TOLERANCE, calibrate_noise_multiplier

DELTA = 1e-5


def opacus_epsilon(history: list[tuple[float, float, int]], accountant: str,
                   delta: float = DELTA) -> float:
    account = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    account.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(account.get_epsilon(delta=delta))


def opacus_steps(sigma: float, q: float, steps: int, accountant: str) -> float:
    """One accountant driven step by step, exactly as the DP optimizer's hook drives it."""
    account = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        account.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(account.get_epsilon(delta=DELTA))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("sigma", "q", "steps"), [
    (1.0, 0.01, 1000), (1.1, 1 / 9, 90), (3.0, 1.0, 5), (2.0, 0.1, 1)])
def test_epsilon_equals_opacus(accountant: str, sigma: float, q: float, steps: int) -> None:
    ours = epsilon([PrivacyEvent("dp_sgd", sigma, q, steps)], delta=DELTA, accountant=accountant)
    assert ours == opacus_epsilon([(sigma, q, steps)], accountant)
    assert 0 < ours < math.inf


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_compose_to_one_accountant_run(accountant: str) -> None:
    rounds = [PrivacyEvent("dp_sgd", 1.2, 0.05, 20) for _ in range(5)]
    per_round = [epsilon(rounds[:k], delta=DELTA, accountant=accountant) for k in range(1, 6)]
    # the final composition is exactly one accountant stepped 100 times
    assert per_round[-1] == opacus_steps(1.2, 0.05, 100, accountant)
    assert all(a < b for a, b in itertools.pairwise(per_round))


def test_heterogeneous_history_matches_opacus() -> None:
    events = [PrivacyEvent("dp_sgd", 1.0, 0.1, 10), PrivacyEvent("dp_sgd", 1.0, 0.1, 5),
              PrivacyEvent("dp_fedavg", 2.0, 0.3, 1), PrivacyEvent("dp_sgd", 1.0, 0.1, 7)]
    assert compose(events) == [(1.0, 0.1, 15), (2.0, 0.3, 1), (1.0, 0.1, 7)]
    for accountant in ("rdp", "prv"):
        assert epsilon(events, delta=DELTA, accountant=accountant) == opacus_epsilon(
            [(1.0, 0.1, 15), (2.0, 0.3, 1), (1.0, 0.1, 7)], accountant)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
       st.sampled_from([(0.9, 0.02), (1.3, 0.1), (4.0, 0.5)]))
def test_any_split_into_rounds_equals_one_run(splits: list[int],
                                              params: tuple[float, float]) -> None:
    sigma, q = params
    events = [PrivacyEvent("dp_sgd", sigma, q, s) for s in splits]
    assert epsilon(events, delta=DELTA) == opacus_epsilon([(sigma, q, sum(splits))], "rdp")


def test_no_events_is_zero_and_delta_changes_epsilon() -> None:
    assert epsilon([], delta=DELTA) == 0.0
    event = PrivacyEvent("dp_sgd", 1.0, 0.1, 50)
    assert epsilon([event], delta=1e-3) < epsilon([event], delta=1e-6)
    with pytest.raises(ValueError, match="delta"):
        epsilon([event], delta=0.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_multiplier": 0.0}, "noise_multiplier"),
    ({"noise_multiplier": math.nan}, "noise_multiplier"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.0}, "steps"),
    ({"mechanism": "laplace"}, "mechanism"),
])
def test_event_rejects_bad_values(kwargs: dict, message: str) -> None:
    values = {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1}
    with pytest.raises(ValueError, match=message):
        PrivacyEvent(**{**values, **kwargs})


def test_event_is_immutable() -> None:
    event = PrivacyEvent("dp_sgd", 1.0, 0.1, 1)
    with pytest.raises(AttributeError):
        event.steps = 2  # type: ignore[misc]


def test_prv_calibration_is_opacus_search() -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.1,
                                       steps=200, accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.1,
                                        steps=200, accountant="prv")
    assert sigma == expected
    spent = epsilon([PrivacyEvent("dp_sgd", sigma, 0.1, 200)], delta=DELTA, accountant="prv")
    assert 3.0 - 0.011 <= spent <= 3.0


@pytest.mark.parametrize(("target", "delta", "sample_rate", "steps"), [
    (8.0, 1e-5, 0.1, 1000),      # examples/dp_sgd.toml's clients
    (8.0, 1e-5, 1 / 30, 3000),
    (3.0, 1e-5, 0.1, 200),
    (1.0, 1e-6, 0.01, 5000),     # small q, many steps
    (0.5, 1e-5, 0.2, 50),        # large sigma, large optimal order
    (16.0, 1e-5, 0.05, 500),     # small sigma, small fractional optimal order
    (2.0, 1e-5, 1.0, 10),        # no subsampling (DP-FedAvg, public sample)
])
def test_rdp_calibration_meets_opacus_contract(target: float, delta: float,
                                                sample_rate: float, steps: int) -> None:
    """The sigma found spends, by Opacus's own RDP accountant, at most the target and within
    Opacus's epsilon_tolerance of it: the same epsilon, to that precision, as the sigma of
    Opacus's get_noise_multiplier."""
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta,
                                       sample_rate=sample_rate, steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps)
    ours = opacus_epsilon([(sigma, sample_rate, steps)], "rdp", delta)
    theirs = opacus_epsilon([(reference, sample_rate, steps)], "rdp", delta)
    assert target - EPSILON_TOLERANCE <= ours <= target
    assert abs(ours - theirs) <= EPSILON_TOLERANCE
    assert ours == epsilon([PrivacyEvent("dp_sgd", sigma, sample_rate, steps)], delta=delta)


def test_rdp_calibration_falls_back_to_opacus_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should no refinement pass the full accountant's check, Opacus's own search decides."""
    from securefl.privacy import calibration

    monkeypatch.setattr(calibration, "_WINDOWS", 0)
    calibrate_noise_multiplier.cache_clear()
    try:
        sigma = calibrate_noise_multiplier(target_epsilon=0.5, delta=DELTA, sample_rate=0.2,
                                           steps=50)
    finally:
        calibrate_noise_multiplier.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert sigma == get_noise_multiplier(target_epsilon=0.5, target_delta=DELTA,
                                             sample_rate=0.2, steps=50)


def test_calibration_rejects_unreachable_target() -> None:
    # without subsampling, epsilon stays above ~0.2 at delta 1e-5 for any sigma
    with pytest.raises(ConfigError, match="cannot be reached"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=DELTA, sample_rate=1.0, steps=10)


def test_calibration_rejects_bad_target() -> None:
    with pytest.raises(ConfigError, match="target_epsilon must be > 0"):
        calibrate_noise_multiplier(target_epsilon=0.0, delta=DELTA, sample_rate=0.1, steps=10)
