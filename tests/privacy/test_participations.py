"""Public sampling: the rounds a client is calibrated for (a quantile of its participations)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from securefl.config import load_config
from securefl.privacy import distributed_settings
from securefl.privacy.calibration import PARTICIPATION_QUANTILE, calibrated_participations

EXAMPLES = Path(__file__).parents[2] / "examples"


def tail(k: int, rounds: int, q: float) -> float:
    """``P(Binomial(rounds, q) > k)``, summed from the pmf."""
    return sum(math.comb(rounds, j) * q ** j * (1 - q) ** (rounds - j)
               for j in range(k + 1, rounds + 1))


@pytest.mark.parametrize(("rounds", "q", "quantile"), [
    (30, 0.2, 0.999), (30, 0.2, 0.99), (4, 0.25, 0.99), (200, 0.05, 0.999), (12, 0.5, 0.9)])
def test_the_quantile_is_the_smallest_count_whose_tail_is_below_one_minus_p(rounds, q,
                                                                            quantile):
    k = calibrated_participations(rounds=rounds, rate=q, quantile=quantile)
    assert tail(k, rounds, q) <= 1 - quantile < tail(k - 1, rounds, q)


def test_the_federation_of_the_example_is_calibrated_for_13_rounds_not_6():
    # Binomial(30, 0.2): P(K > 12) = 0.0031, P(K > 13) = 0.0009
    assert calibrated_participations(rounds=30, rate=0.2, quantile=None) == 6
    assert calibrated_participations(rounds=30, rate=0.2, quantile=0.999) == 13
    assert tail(13, 30, 0.2) == pytest.approx(9.019e-4, rel=1e-3)
    config = load_config(EXAMPLES / "distributed_dp.toml")
    assert config.privacy.participation_quantile == PARTICIPATION_QUANTILE == 0.999
    assert distributed_settings(config, 100).steps == 13
    default = config.replace(privacy__participation_quantile=None)
    assert distributed_settings(default, 100).steps == 13
    median = config.replace(privacy__participation_quantile=0.5)
    assert distributed_settings(median, 100).steps == 6


def test_the_rate_one_federation_and_bad_inputs():
    assert calibrated_participations(rounds=7, rate=1.0, quantile=0.999) == 7
    assert calibrated_participations(rounds=3, rate=0.001, quantile=0.5) == 1
    with pytest.raises(ValueError, match="quantile"):
        calibrated_participations(rounds=3, rate=0.5, quantile=1.0)
    with pytest.raises(ValueError, match="rounds"):
        calibrated_participations(rounds=0, rate=0.5, quantile=None)
