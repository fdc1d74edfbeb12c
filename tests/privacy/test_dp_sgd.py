"""DP-SGD through Opacus: wrapped once, the accountant agrees with the ledger across rounds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from securefl.data.datasets import Dataset
from securefl.engine.client import Client
from securefl.engine.messages import Decline, FitIns, FitRes
from securefl.engine.protection import Plain
from securefl.engine.trainer import LocalTrainer
from securefl.errors import ConfigError, ProtocolAbort
from securefl.models import CNN, MLP
from securefl.privacy.accounting import PrivacyEvent, epsilon
from securefl.privacy.dp_sgd import DPSGDTrainer, batches_per_epoch, make_compatible
from securefl.privacy.ledger import PrivacyLedger
from securefl.vector import flatten

RUN = b"\x07" * 32

DELTA = 1e-5


def dataset(n: int, *, image: bool = False, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    features = (rng.normal(size=(n, 16)) + labels[:, None]).astype(np.float32)
    if image:
        features = features.reshape(n, 1, 4, 4)
    return Dataset(features, labels.astype(np.int64), 3, "toy")


def trainer(model: nn.Module | None = None, *, n: int = 90, image: bool = False,
            epochs: int = 1, batch_size: int = 16) -> LocalTrainer:
    model = model if model is not None else MLP(16, 3, (8,))
    return LocalTrainer(model, dataset(n, image=image), dataset(30, image=image, seed=1),
                        epochs=epochs, batch_size=batch_size, lr=0.2, seed=3)


def wrap(base: LocalTrainer, ledger: PrivacyLedger, **options: object) -> DPSGDTrainer:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **options}
    return DPSGDTrainer(base.task(), client_id="c", ledger=ledger, **settings)  # type: ignore[arg-type]


def test_batches_per_epoch_follows_opacus() -> None:
    assert batches_per_epoch(90, 16) == 6
    assert batches_per_epoch(16, 16) == 1
    # Opacus's int(1 / (1 / 93)) == 92: the accountant's rate is 1 / 92, and so is ours
    assert batches_per_epoch(93, 1) == 92
    with pytest.raises(ValueError):
        batches_per_epoch(0, 16)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_equals_opacus_engine_accountant_over_rounds(accountant: str) -> None:
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=None, accountant=accountant)
    dp = wrap(trainer(epochs=2), ledger, accountant=accountant)
    assert dp.round_event() == PrivacyEvent("dp_sgd", 1.0, 1 / 6, 12)
    parameters = flatten(dp.model)
    spent = []
    for rnd in (1, 2, 3):
        update, metrics = dp.fit(parameters, round=rnd)
        parameters = parameters + update.delta
        spent.append(metrics["epsilon"])
    # the engine was built once: its accountant holds all 36 steps of the three rounds
    assert dp.engine.accountant.history == [(1.0, 1 / 6, 36)]
    assert ledger.epsilon("c") == spent[-1] == pytest.approx(dp.opacus_epsilon(DELTA), abs=0)
    assert spent[-1] == epsilon([PrivacyEvent("dp_sgd", 1.0, 1 / 6, 36)], delta=DELTA,
                                accountant=accountant)
    assert spent[0] < spent[1] < spent[2]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_every_grad_sample_mode_trains(mode: str) -> None:
    base = trainer(CNN(1, 3, width=4), image=True)
    before = flatten(base.model)
    dp = wrap(base, PrivacyLedger(":memory:", delta=DELTA), grad_sample_mode=mode,
              noise_multiplier=0.5)
    update, metrics = dp.fit(before, round=1)
    assert update.delta.dtype == np.float32 and update.delta.shape == before.shape
    assert np.isfinite(update.delta).all() and np.linalg.norm(update.delta) > 0
    assert update.weight == 90.0
    # no training loss leaves a private client: it is computed without noise
    assert set(metrics) == {"epsilon", "delta", "noise_multiplier"}
    assert metrics["epsilon"] > 0 and metrics["delta"] == DELTA
    assert len(dp.engine.accountant.history) == 1


def test_noise_scale_matches_sigma_c_over_batch() -> None:
    """One full-batch step (q = 1, lr = 1): the update is the clipped mean gradient (norm at
    most C) plus noise of std sigma * C / N per coordinate (Abadi et al. 2016, Algorithm 1)."""
    model = nn.Linear(16, 30, bias=False)
    base = LocalTrainer(model, dataset(800), dataset(10), epochs=1, batch_size=800, lr=1.0,
                        seed=5)
    dp = wrap(base, PrivacyLedger(":memory:", delta=DELTA), noise_multiplier=4000.0,
              max_grad_norm=1e-3)
    update, _ = dp.fit(np.zeros(480, np.float32), round=1)
    expected = 4000.0 * 1e-3 / 800
    assert np.std(update.delta) == pytest.approx(expected, rel=0.15)
    assert dp.round_event() == PrivacyEvent("dp_sgd", 4000.0, 1.0, 1)


def test_retried_round_is_answered_without_training_again() -> None:
    ledger = PrivacyLedger(":memory:", delta=DELTA)
    dp = wrap(trainer(), ledger)
    parameters = flatten(dp.model)
    first, _ = dp.fit(parameters, round=1)
    again, _ = dp.fit(parameters, round=1)
    np.testing.assert_array_equal(again.delta, first.delta)
    assert dp.engine.accountant.history == [(1.0, 1 / 6, 6)]
    assert ledger.events("c") == [dp.round_event()]
    # the same round with other parameters: the site's release log refuses it untrained
    client = Client("c", dp, Plain())
    client.handle(FitIns(run=RUN, round=1, parameters=parameters, config={}, protection=None),
                  round=1)
    with pytest.raises(ProtocolAbort):
        client.handle(FitIns(run=RUN, round=1, parameters=parameters + 1, config={},
                             protection=None), round=1)
    assert ledger.events("c") == [dp.round_event()]


def test_a_model_is_wrapped_once() -> None:
    base = trainer()
    wrap(base, PrivacyLedger(":memory:", delta=DELTA))
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(base, PrivacyLedger(":memory:", delta=DELTA))


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.fc(x))))


def test_unsupported_model_is_a_clear_error_and_fix_is_offered() -> None:
    with pytest.raises(ConfigError, match=r"BatchNorm.*fix_model = true"):
        wrap(trainer(WithBatchNorm()), PrivacyLedger(":memory:", delta=DELTA))
    base = trainer(WithBatchNorm())
    dp = wrap(base, PrivacyLedger(":memory:", delta=DELTA), fix_model=True)
    # the DP trainer trains the fixed copy; like make_private it leaves its input alone
    assert isinstance(dp.model.norm, nn.GroupNorm) and isinstance(base.model.norm,
                                                                 nn.BatchNorm1d)
    update, _ = dp.fit(flatten(dp.model), round=1)
    assert np.isfinite(update.delta).all()


def test_compatible_model_is_returned_unchanged() -> None:
    model = MLP(16, 3)
    assert make_compatible(model, fix=False) is model


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_secure_mode_needs_no_torchcsprng_and_keeps_the_noise_scale(mode: str) -> None:
    """The CSPRNG path on the pinned stack: same sigma C / N noise, nothing reproducible."""
    def update(secure: bool) -> np.ndarray:
        base = LocalTrainer(nn.Linear(16, 30, bias=False), dataset(800), dataset(10), epochs=1,
                            batch_size=800, lr=1.0, seed=5)
        dp = wrap(base, PrivacyLedger(":memory:", delta=DELTA), noise_multiplier=4000.0,
                  max_grad_norm=1e-3, secure_mode=secure, grad_sample_mode=mode)
        return dp.fit(np.zeros(480, np.float32), round=1)[0].delta

    first, second = update(True), update(True)
    assert np.std(first) == pytest.approx(4000.0 * 1e-3 / 800, rel=0.15)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(update(False), update(False))


def test_exhausted_budget_declines_and_never_exceeds() -> None:
    event = PrivacyEvent("dp_sgd", 1.0, 1 / 6, 6)
    budget = (epsilon([event] * 2, delta=DELTA) + epsilon([event] * 3, delta=DELTA)) / 2
    ledger = PrivacyLedger(":memory:", delta=DELTA, budgets=budget)
    dp = wrap(trainer(), ledger)
    client = Client("c", dp, Plain())
    parameters = flatten(dp.model)
    replies = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(1, 6):  # each round from a new global model
            request = FitIns(run=RUN, round=rnd, parameters=parameters + rnd, config={},
                             protection=None)
            replies.append(client.handle(request, round=rnd))
    assert [type(r) for r in replies] == [FitRes, FitRes, Decline, Decline, Decline]
    assert "over its budget" in replies[2].reason
    assert ledger.rounds("c") == [1, 2]
    assert all(eps <= budget for _, eps in ledger.history("c"))
    # nothing was trained in the declined rounds: Opacus counted two rounds of steps only
    assert dp.engine.accountant.history == [(1.0, 1 / 6, 12)]
