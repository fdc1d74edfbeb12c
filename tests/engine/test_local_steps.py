"""The distributed-SGD setting of :class:`LocalTrainer`: ``local_steps`` minibatch steps per
round, worker momentum kept on the client across rounds, and exact redos of a round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from securefl.config import config_from_dict
from securefl.data import Dataset
from securefl.engine.trainer import LocalTrainer, RoundRewind
from securefl.errors import ConfigError
from securefl.vector import flatten


def _data(n: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 2, n), 2, "t")


def _trainer(**kwargs: object) -> LocalTrainer:
    torch.manual_seed(0)  # only the model's initial weights; the trainer has its own stream
    model = nn.Sequential(nn.Linear(3, 2))
    options = {"epochs": 3, "batch_size": 4, "lr": 0.1, "seed": 7, **kwargs}
    return LocalTrainer(model, _data(), _data(0), **options)  # type: ignore[arg-type]


def _gradient(trainer: LocalTrainer, parameters: np.ndarray, batch: torch.Tensor) -> np.ndarray:
    """The minibatch gradient at ``parameters``, computed independently of ``fit``."""
    model = nn.Sequential(nn.Linear(3, 2))
    from securefl.vector import unflatten

    unflatten(model, parameters)
    loss = nn.functional.cross_entropy(model(trainer.features[batch]), trainer.labels[batch])
    loss.backward()
    return np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])


def _order(seed: int, n: int, passes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator) for _ in range(passes)]


def test_one_local_step_sends_minus_lr_times_one_minibatch_gradient() -> None:
    trainer = _trainer(local_steps=1)
    x0 = flatten(trainer.model).copy()
    first, second = _order(7, 10, 1)[0][:4], _order(7, 10, 1)[0][4:8]
    update, _ = trainer.fit(x0, round=1)
    np.testing.assert_allclose(update.delta, -0.1 * _gradient(trainer, x0, first), atol=1e-6)
    # the next round takes the next minibatch of the same pass, not a fresh shuffle
    update, _ = trainer.fit(x0, round=2)
    np.testing.assert_allclose(update.delta, -0.1 * _gradient(trainer, x0, second), atol=1e-6)
    assert update.weight == 10.0


def test_steps_run_across_passes_and_epochs_are_ignored() -> None:
    trainer = _trainer(local_steps=4)  # 10 examples, batch 4: 3 batches per pass (4, 4, 2)
    trainer.fit(flatten(trainer.model).copy(), round=1)
    # 4 steps used one whole pass (3 batches) and the first batch of a second pass
    passes = _order(7, 10, 2)
    assert torch.equal(trainer._order, passes[1][4:])


def test_kept_momentum_is_worker_momentum_across_rounds() -> None:
    """m_1 = g_1, m_2 = beta m_1 + g_2, update_t = -lr m_t (Karimireddy et al. 2021)."""
    kept = _trainer(local_steps=1, momentum=0.9, keep_momentum=True)
    fresh = _trainer(local_steps=1, momentum=0.9)
    x0 = flatten(kept.model).copy()
    batches = _order(7, 10, 1)[0]
    g1 = _gradient(kept, x0, batches[:4])
    kept.fit(x0, round=1)
    fresh.fit(x0, round=1)
    x1 = x0 - 0.5  # the server's next model: any vector
    g2 = _gradient(kept, x1, batches[4:8])
    update, _ = kept.fit(x1, round=2)
    np.testing.assert_allclose(update.delta, -0.1 * (0.9 * g1 + g2), atol=1e-5)
    restarted, _ = fresh.fit(x1, round=2)  # without keep_momentum: the buffer restarts
    np.testing.assert_allclose(restarted.delta, -0.1 * g2, atol=1e-6)


def test_a_redone_round_restores_the_momentum_and_the_pass() -> None:
    trainer = RoundRewind(_trainer(local_steps=1, momentum=0.9, keep_momentum=True))
    x = flatten(trainer.base.model).copy()
    trainer.fit(x, round=1)
    once, _ = trainer.fit(x, round=2)
    again, _ = trainer.fit(x, round=2)  # the round redone: same batch, same buffer
    np.testing.assert_array_equal(once.delta, again.delta)
    straight = _trainer(local_steps=1, momentum=0.9, keep_momentum=True)
    straight.fit(x, round=1)
    reference, _ = straight.fit(x, round=2)
    np.testing.assert_array_equal(once.delta, reference.delta)


def test_the_fl_setting_stays_the_default() -> None:
    config = config_from_dict({})
    assert config.client.local_steps is None and config.client.keep_momentum is False
    trainer = _trainer()
    _, metrics = trainer.fit(flatten(trainer.model).copy(), round=1)
    assert trainer._order.numel() == 0 and np.isfinite(metrics["train_loss"])


@pytest.mark.parametrize(("table", "says"), [
    ({"client": {"local_steps": 0}}, "[client] local_steps must be >= 1, got 0"),
    ({"client": {"local_steps": 1}, "privacy": {"mode": "dp_sgd", "noise_multiplier": 1.0}},
     "[client] local_steps is not supported with [privacy] mode = \"dp_sgd\""),
    ({"client": {"keep_momentum": True}, "privacy": {"mode": "dp_sgd",
                                                     "noise_multiplier": 1.0}},
     "[client] keep_momentum is not supported"),
])
def test_bad_local_step_settings_are_config_errors(table: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(table, source="run.toml")
    assert says in str(excinfo.value)
