"""The mimic attack (Karimireddy, He & Jaggi, ICLR 2022): the byzantine rows copy one honest
worker, chosen along the honest updates' top principal direction and then kept."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.attacks.mimic import Mimic
from securefl.attacks.registry import build_attack

# spread along the first axis: the top principal direction is +-e1
ROWS = np.array([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [0.0, 0.1]], np.float32)


@pytest.mark.parametrize(("seed", "target"), [(0, 2), (1, 2), (4, 1), (5, 1)])
def test_the_target_is_the_extreme_worker_along_the_principal_direction(seed: int,
                                                                        target: int) -> None:
    # z = C z0 with C the scatter of the rows (C_11 = 8.75, C_12 = -0.075, C_22 = 0.0075):
    # z points along +e1 when z0_1 > 0 (seeds 0, 1), so argmax <g_i, z> is the worker at 3,
    # and along -e1 when z0_1 < 0 (seeds 4, 5), the worker at -1
    attack = Mimic()
    out = attack(ROWS, num_byzantine=3, rng=np.random.default_rng(seed))
    assert attack.target == target and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.repeat(ROWS[[target]], 3, axis=0))


def test_after_the_warm_up_the_same_worker_is_copied_whatever_it_sends() -> None:
    attack = Mimic()
    attack(ROWS, num_byzantine=2, rng=np.random.default_rng(0))
    later = np.array([[0.0, 0.0], [9.0, 9.0], [-5.0, 2.0], [7.0, -7.0]], np.float32)
    out = attack(later, num_byzantine=2, rng=np.random.default_rng(1))
    assert attack.target == 2  # not re-chosen: row 1 now reaches further along e1
    np.testing.assert_array_equal(out, [[-5.0, 2.0], [-5.0, 2.0]])


def test_a_longer_warm_up_tracks_the_direction_then_fixes_the_target() -> None:
    attack = Mimic(warmup=2)
    attack(ROWS, num_byzantine=1, rng=np.random.default_rng(0))
    assert attack.target == 2
    # round 1 re-estimates: mu = (mu_0 + mean_1) / 2 = (0.375, 3.825); the rows centred on it
    # have x = -0.375 and y - 3.825, so the power step from z ~ e1 is C e1 ~ (0.56, -5.7),
    # and z = (e1 + step / |step|) / 2, normalised, ~ (0.74, -0.67): worker 1 (0, -1) is
    # furthest along it (0.67), worker 3 (0, 30) the least (-20)
    vertical = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 0.5], [0.0, 30.0]], np.float32)
    attack(vertical, num_byzantine=1, rng=np.random.default_rng(0))
    assert attack.target == 1
    out = attack(ROWS, num_byzantine=1, rng=np.random.default_rng(0))
    assert attack.target == 1 and out.tolist() == [[-1.0, 0.0]]


def test_registered_and_omniscient() -> None:
    attack = build_attack("mimic", warmup=1)
    assert isinstance(attack, Mimic) and attack.omniscient
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        Mimic(warmup=0)
    attack(ROWS, num_byzantine=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="not among the 2 honest rows"):
        attack(ROWS[:2], num_byzantine=1, rng=np.random.default_rng(0))
