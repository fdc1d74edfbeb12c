"""User-level DP-FedAvg: clipping, server noise, fixed denominator, adaptive clipping, charges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from securefl.engine.protection import Rows, Update, WeightedSum
from securefl.errors import BudgetExceeded, ConfigError
from securefl.privacy.accounting import PrivacyEvent, epsilon
from securefl.privacy.dp_fedavg import (
    ClipState,
    UserLevelNoise,
    UserLevelTrainer,
    clip_update,
    clipped_fraction,
    update_noise_multiplier,
)
from securefl.privacy.ledger import PrivacyLedger

DELTA = 1e-5
EVENT = PrivacyEvent("dp_fedavg", 1.0, 0.2, 1)


def test_clip_update_bounds_the_norm() -> None:
    clipped, norm = clip_update(np.array([3.0, 4.0], np.float32), 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    small, norm = clip_update(np.array([0.3, 0.4], np.float32), 1.0)
    np.testing.assert_array_equal(small, np.array([0.3, 0.4], np.float32))
    assert norm == pytest.approx(0.5)
    zero, norm = clip_update(np.zeros(3, np.float32), 1.0)
    assert norm == 0.0 and not zero.any()


def test_update_noise_multiplier_andrew_et_al() -> None:
    assert update_noise_multiplier(1.0, None) == 1.0
    # z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2 = (1 - 1/4)^-1/2 for z = 1, sigma_b = 1
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    with pytest.raises(ConfigError, match="2 \\* clipped_count_stddev > noise_multiplier"):
        update_noise_multiplier(2.0, 1.0)


def _noise(clip: ClipState, ledger: PrivacyLedger, *, z: float = 2.0, m: int = 4,
           ids: tuple[str, ...] = ("a", "b", "c", "d", "e")) -> UserLevelNoise:
    return UserLevelNoise(clip=clip, noise_multiplier=z, update_noise_multiplier=z,
                          expected_clients=m, ledger=ledger, client_ids=ids, event=EVENT)


def test_server_noise_std_is_z_times_c_and_denominator_is_fixed() -> None:
    ledger = PrivacyLedger(":memory:", delta=DELTA)
    hook = _noise(ClipState(0.5, adaptive=False), ledger)
    d = 20_000
    rows = Rows(("a", "b"), np.ones((2, d), np.float32), np.array([100.0, 7.0]))
    out = hook.transform_combined(rows, round=1, rng=np.random.default_rng(0))
    assert isinstance(out, WeightedSum)
    assert out.total_weight == 4.0  # the expected m, not the 2 that arrived
    noise = out.total - 2.0  # unit weights: the FedAvg weights 100 and 7 are ignored
    assert abs(noise.mean()) < 0.05
    assert noise.std() == pytest.approx(2.0 * 0.5, rel=0.03)
    np.testing.assert_allclose(out.mean(), out.total / 4.0, rtol=1e-6)


def test_weighted_sum_input_gets_the_same_noise() -> None:
    ledger = PrivacyLedger(":memory:", delta=DELTA)
    hook = _noise(ClipState(1.0, adaptive=False), ledger, z=0.5)
    combined = WeightedSum(("a",), np.zeros(10_000), 1.0)
    out = hook.transform_combined(combined, round=1, rng=np.random.default_rng(1))
    assert out.total.std() == pytest.approx(0.5, rel=0.05)
    assert out.client_ids == ("a",) and out.total_weight == 4.0


def test_server_charges_every_client_while_it_fits() -> None:
    budget = epsilon([EVENT] * 2, delta=DELTA)
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=budget)
    hook = _noise(ClipState(1.0, adaptive=False), ledger)
    rows = Rows(("a",), np.zeros((1, 3), np.float32), np.ones(1))
    for rnd in (1, 2, 3):
        hook.transform_combined(rows, round=rnd, rng=np.random.default_rng(rnd))
    for client_id in ("a", "b", "c", "d", "e"):
        assert ledger.rounds(client_id) == [1, 2]  # round 3 would have exceeded the budget
        assert ledger.epsilon(client_id) <= budget


def test_adaptive_clipping_follows_the_geometric_update() -> None:
    clip = ClipState(1.0, adaptive=True, target_quantile=0.5, learning_rate=0.2,
                     count_stddev=0.5)
    for cid, unclipped in (("a", True), ("b", True), ("c", True), ("d", False)):
        clip.record(7, cid, unclipped)
    clip.record(8, "a", False)  # another round's bit is kept for that round
    noisy = clip.adapt(7, ["a", "b", "c", "d"], expected_clients=4,
                       rng=np.random.default_rng(3))
    # centred bits: (sum (b - 1/2) + noise) / m + 1/2
    expected_noisy = (1.0 + np.random.default_rng(3).normal(0.0, 0.5)) / 4 + 0.5
    assert noisy == pytest.approx(expected_noisy)
    assert clip.clip_norm == pytest.approx(math.exp(-0.2 * (expected_noisy - 0.5)))
    # mostly unclipped -> the bound shrinks toward the median norm
    assert clip.clip_norm < 1.0


def test_adaptive_clipping_converges_to_the_quantile() -> None:
    norms = np.linspace(0.1, 10.0, 50)
    clip = ClipState(50.0, adaptive=True, target_quantile=0.5, learning_rate=0.2,
                     count_stddev=0.0)
    rng = np.random.default_rng(0)
    for rnd in range(1, 400):
        for index, norm in enumerate(norms):
            clip.record(rnd, str(index), bool(norm <= clip.clip_norm))
        clip.adapt(rnd, [str(i) for i in range(50)], expected_clients=50, rng=rng)
    assert clip.clip_norm == pytest.approx(float(np.median(norms)), rel=0.15)


def test_adaptive_clipping_without_bits_keeps_the_bound() -> None:
    clip = ClipState(2.0, adaptive=True, count_stddev=1.0)
    assert clip.adapt(1, ["a", "b"], expected_clients=2, rng=np.random.default_rng(0)) is None
    assert clip.clip_norm == 2.0


class Fixed:
    """A trainer stub returning a given delta."""

    def __init__(self, delta: np.ndarray) -> None:
        self.delta, self.calls = delta, 0

    def fit(self, parameters: np.ndarray, *, round: int) -> tuple[Update, dict[str, float]]:
        self.calls += 1
        return Update(self.delta.copy(), 123.0), {"train_loss": 0.5}

    def evaluate(self, parameters: np.ndarray) -> tuple[int, float, float]:
        return 1, 0.0, 1.0


def test_user_level_trainer_charges_missed_rounds_clips_and_weights_one() -> None:
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=None)
    clip = ClipState(1.0, adaptive=True, count_stddev=0.1)
    base = Fixed(np.array([3.0, 4.0], np.float32))
    trainer = UserLevelTrainer(base, client_id="a", ledger=ledger, event=EVENT, clip=clip,
                               sampling="secret")
    update, metrics = trainer.fit(np.zeros(2, np.float32), round=3)
    assert ledger.rounds("a") == [1, 2, 3]  # each round costs every available user
    assert metrics["epsilon"] == epsilon([EVENT] * 3, delta=DELTA)
    assert update.weight == 1.0
    assert np.linalg.norm(update.delta) == pytest.approx(1.0, rel=1e-6)
    assert metrics == {"epsilon": metrics["epsilon"], "delta": DELTA, "clip_norm": 1.0}
    assert clip.adapt(3, ["a"], expected_clients=1, rng=np.random.default_rng(0)) < 0.5
    again, _ = trainer.fit(np.zeros(2, np.float32), round=3)
    np.testing.assert_array_equal(again.delta, update.delta)
    assert base.calls == 1 and ledger.rounds("a") == [1, 2, 3]


def test_a_public_sample_charges_q_1_for_each_round_taken_part_only() -> None:
    public = PrivacyEvent("dp_fedavg", 1.0, 1.0, 1)
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=None)
    base = Fixed(np.array([3.0, 4.0], np.float32))
    trainer = UserLevelTrainer(base, client_id="a", ledger=ledger, event=public,
                               clip=ClipState(1.0, adaptive=False))
    hook = UserLevelNoise(clip=ClipState(1.0, adaptive=False), noise_multiplier=1.0,
                          update_noise_multiplier=1.0, expected_clients=2, ledger=ledger,
                          client_ids=("a", "b"), event=public, charge_every_round=False)
    _, metrics = trainer.fit(np.zeros(2, np.float32), round=3)
    _, later = trainer.fit(np.ones(2, np.float32), round=7)
    hook.transform_combined(Rows(("a",), np.zeros((1, 2), np.float32), np.ones(1)), round=7,
                            rng=np.random.default_rng(0))
    assert ledger.rounds("a") == [3, 7] and ledger.rounds("b") == []
    assert later["epsilon"] == epsilon([public] * 2, delta=DELTA) > metrics["epsilon"]


def test_user_level_trainer_declines_over_budget() -> None:
    budget = epsilon([EVENT] * 2, delta=DELTA)
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=budget)
    base = Fixed(np.ones(2, np.float32))
    trainer = UserLevelTrainer(base, client_id="a", ledger=ledger, event=EVENT,
                               clip=ClipState(1.0, adaptive=False), sampling="secret")
    with pytest.raises(BudgetExceeded):
        trainer.fit(np.zeros(2, np.float32), round=3)
    assert base.calls == 0
    assert ledger.rounds("a") == [1, 2]
    with pytest.raises(BudgetExceeded):
        trainer.fit(np.zeros(2, np.float32), round=4)
    assert ledger.epsilon("a") <= budget


def test_catch_up_charges_a_secret_sample_what_the_server_charges_and_a_public_one_nothing(
) -> None:
    """A site out of process charges itself the rounds the in-process server's copy of the
    ledger charges every client: each round before the given one, while it fits."""
    budget = epsilon([EVENT] * 2, delta=DELTA)
    secret, server = (PrivacyLedger(":memory:", delta=DELTA, budgets=budget) for _ in "ab")
    trainer = UserLevelTrainer(Fixed(np.ones(2, np.float32)), client_id="a", ledger=secret,
                               event=EVENT, clip=ClipState(1.0, adaptive=False),
                               sampling="secret")
    hook = UserLevelNoise(clip=ClipState(1.0, adaptive=False), noise_multiplier=1.0,
                          update_noise_multiplier=1.0, expected_clients=1, ledger=server,
                          client_ids=("a",), event=EVENT)
    for rnd in (1, 2, 3):
        hook.transform_combined(WeightedSum(("b",), np.zeros(2), 1.0), round=rnd,
                                rng=np.random.default_rng(0))
    with pytest.raises(BudgetExceeded):
        trainer.catch_up(4)
    assert secret.history("a") == server.history("a") and secret.rounds("a") == [1, 2]
    public = PrivacyLedger(":memory:", delta=DELTA, budgets=None)
    UserLevelTrainer(Fixed(np.ones(2, np.float32)), client_id="a", ledger=public,
                     event=EVENT, clip=ClipState(1.0, adaptive=False)).catch_up(4)
    assert public.rounds("a") == []


def test_adaptive_clipping_count_has_sensitivity_half_and_the_paper_epsilon() -> None:
    """Andrew et al. (NeurIPS 2021): with centred bits one user moves the released count's
    sum by at most 1/2, so count noise sigma_b is a Gaussian of multiplier 2 sigma_b; with the
    update's z_Delta the two compose (RDP alpha / (2 z^2) adds) to one Gaussian of
    z = (z_Delta^-2 + (2 sigma_b)^-2)^-1/2, the z the ledger charges."""
    m, sigma_b, z = 20, 1.0, 1.2
    bits = [True] * 12 + [False] * 8
    released = clipped_fraction(bits, expected_clients=m, noise=0.0)
    assert released == pytest.approx(0.6)
    # sensitivity of the noised sum (released * m): add or remove any one user
    neighbours = [bits[:-1], bits[1:], [*bits, True], [*bits, False]]
    moves = [abs(clipped_fraction(n, expected_clients=m, noise=0.0) - released) * m
             for n in neighbours]
    assert max(moves) == pytest.approx(0.5)
    z_update = update_noise_multiplier(z, sigma_b)
    count_multiplier = sigma_b / max(moves)
    composed = (z_update ** -2 + count_multiplier ** -2) ** -0.5
    assert composed == pytest.approx(z)
    charged = epsilon([PrivacyEvent("dp_fedavg", z, 0.2, 30)], delta=DELTA)
    assert epsilon([PrivacyEvent("dp_fedavg", composed, 0.2, 30)], delta=DELTA) == \
        pytest.approx(charged)
    # read with sensitivity 1 (uncentred bits), the same noise would have cost more
    uncentred = (z_update ** -2 + sigma_b ** -2) ** -0.5
    assert epsilon([PrivacyEvent("dp_fedavg", uncentred, 0.2, 30)], delta=DELTA) > charged * 1.1


def test_a_summary_of_some_sites_takes_the_runs_rounds_given() -> None:
    """What an actor reports of its own sites: only those, with the secret-sample epsilon
    over the run's rounds (which may be later than any of its own sites' charges)."""
    from securefl.privacy.report import last_round, summarise

    public = PrivacyEvent("dp_fedavg", 1.0, 1.0, 1)
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets={"a": None, "b": None})
    for client, rnd in (("a", 1), ("a", 2), ("b", 1)):
        ledger.charge(client, public, round=rnd)
    assert last_round(ledger) == 2
    doc = summarise(ledger, sampling_rate=0.5, clients=["b"], rounds=4)
    assert list(doc["clients"]) == ["b"] and doc["clients"]["b"]["rounds"] == 1
    assert doc["clients"]["b"]["epsilon_secret_sampling"] == pytest.approx(epsilon(
        [PrivacyEvent("dp_fedavg", 1.0, 0.5, 4)], delta=DELTA))
    assert summarise(ledger, sampling_rate=0.5)["clients"]["b"]["epsilon_secret_sampling"] \
        == pytest.approx(epsilon([PrivacyEvent("dp_fedavg", 1.0, 0.5, 2)], delta=DELTA))
