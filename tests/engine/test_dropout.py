"""Karimireddy et al. 2022's MNIST network with its dropout (``[model] name = "mnist_cnn"``,
``variant = "karimireddy2022"``): the architecture, masks from the site trainer's own seeded
generator (reproducible, different between sites, never torch's global RNG), eval mode without
dropout, and one-line config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securefl.build import config_from_dict, load_config, local_trainer
from securefl.config import ModelConfig
from securefl.data import ClientData, Dataset, FederatedData
from securefl.engine.trainer import LocalTrainer, RoundRewind
from securefl.errors import ConfigError
from securefl.models import MnistNet, SeededDropout, build_model
from securefl.vector import flatten

THEIRS = ModelConfig(name="mnist_cnn", variant="karimireddy2022")


def _images(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n), 10, "t")


def _federation(sites: int = 2) -> FederatedData:
    clients = {f"client-{i}": ClientData(_images(8, 0), _images(4, 2)) for i in range(sites)}
    return FederatedData(clients, _images(4, 1), 10, (1, 28, 28))


def _config() -> object:
    return config_from_dict({"model": {"name": "mnist_cnn", "variant": "karimireddy2022"},
                             "client": {"batch_size": 8, "lr": 0.1, "local_steps": 1}})


def test_their_net_layers_and_parameter_count():
    """Their ``Net``: conv 1->32, conv 32->64 with no ReLU after it, max-pool, channel
    dropout 0.25, linear 9216->128, ReLU, dropout 0.5, linear 128->10: the same 1,199,882
    parameters as the plain form."""
    model = build_model(THEIRS, (1, 28, 28), 10, seed=0)
    assert isinstance(model, MnistNet)
    kinds = [type(m).__name__ for m in (*model.features, *model.head)]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "MaxPool2d", "SeededDropout", "Flatten",
                     "Linear", "ReLU", "SeededDropout", "Linear"]
    drops = [m for m in model.modules() if isinstance(m, SeededDropout)]
    assert [(d.p, d.channels) for d in drops] == [(0.25, True), (0.5, False)]
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    plain = build_model(ModelConfig(name="mnist_cnn"), (1, 28, 28), 10, seed=0)
    assert [type(m).__name__ for m in plain.features].count("ReLU") == 2
    assert not any(isinstance(m, SeededDropout) for m in plain.modules())


def test_channel_dropout_drops_whole_feature_maps_scaled():
    layer = SeededDropout(0.25, channels=True, generator=torch.Generator().manual_seed(0))
    out = layer(torch.ones(200, 64, 3, 3))
    per_map = out.flatten(2)
    assert torch.equal(per_map.amin(2), per_map.amax(2))  # one value per example and channel
    torch.testing.assert_close(torch.unique(out), torch.tensor([0.0, 4 / 3]))
    assert abs(float((out == 0).float().mean()) - 0.25) < 0.01
    units = SeededDropout(0.5, channels=False, generator=torch.Generator().manual_seed(0))
    dropped = units(torch.ones(400, 128))
    assert set(torch.unique(dropped).tolist()) == {0.0, 2.0}
    assert abs(float((dropped == 0).float().mean()) - 0.5) < 0.01
    x = torch.rand(3, 64, 2, 2)
    assert torch.equal(layer.eval()(x), x)  # eval mode: the identity


def test_evaluation_runs_without_dropout():
    model = build_model(THEIRS, (1, 28, 28), 10, seed=0)
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))  # training draws fresh masks


def test_same_seed_same_weights_after_a_step():
    config, data = _config(), _federation()
    start = flatten(build_model(THEIRS, (1, 28, 28), 10, seed=0))
    first = local_trainer(config, data, "client-0").fit(start, round=0)[0].delta
    again = local_trainer(config, data, "client-0").fit(start, round=0)[0].delta
    np.testing.assert_array_equal(first, again)
    assert np.abs(first).max() > 0


def test_masks_differ_between_sites_and_steps():
    """Both sites hold the same 8 images and take the same whole-shard batch, so their
    updates differ only by their dropout masks; one site's two steps differ as well."""
    config, data = _config(), _federation()
    start = flatten(build_model(THEIRS, (1, 28, 28), 10, seed=0))
    trainers = [local_trainer(config, data, f"client-{i}") for i in range(2)]
    site0, site1 = (t.fit(start, round=0)[0].delta for t in trainers)
    assert not np.array_equal(site0, site1)
    assert not np.array_equal(site0, trainers[0].fit(start, round=1)[0].delta)
    x = torch.ones(16, 64, 1, 1)
    masks = [t.model.features[4](x) for t in trainers]
    assert not torch.equal(masks[0], masks[1])
    # without dropout the two sites' steps on the same batch are equal
    plain = config_from_dict({"model": {"name": "mnist_cnn"},
                              "client": {"batch_size": 8, "lr": 0.1, "local_steps": 1}})
    start = flatten(build_model(ModelConfig(name="mnist_cnn"), (1, 28, 28), 10, seed=0))
    a, b = (local_trainer(plain, data, f"client-{i}").fit(start, round=0)[0].delta
            for i in range(2))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # the batch's order only


def test_training_step_leaves_the_global_rng_alone():
    config, data = _config(), _federation()
    trainer = local_trainer(config, data, "client-0")
    start = flatten(trainer.model)
    before = torch.random.get_rng_state()
    trainer.fit(start, round=0)
    assert trainer.evaluate(start) == trainer.evaluate(start)  # eval mode: no masks
    assert torch.equal(torch.random.get_rng_state(), before)


def test_redone_round_draws_the_same_masks():
    config, data = _config(), _federation()
    trainer = local_trainer(config, data, "client-0")
    assert isinstance(trainer, LocalTrainer)
    rewind = RoundRewind(trainer)
    start = flatten(trainer.model)
    first = rewind.fit(start, round=0)[0].delta
    np.testing.assert_array_equal(rewind.fit(start, round=0)[0].delta, first)


def test_bad_variant_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "mnist_cnn"\nvariant = "theirs"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: [model] variant must be one of 'plain', "
                              f"'karimireddy2022'")
    assert "\n" not in message
    path.write_text('[model]\nname = "mlp"\nvariant = "karimireddy2022"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: [model] variant = 'karimireddy2022' is a form of "
                               f"name = \"mnist_cnn\", not of 'mlp'")


def test_seeded_dropout_refuses_a_bad_probability():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        SeededDropout(1.0, channels=False, generator=torch.Generator())


def _dp_sgd(site: int, ledger_path: object) -> object:
    """Site ``site``'s trainer for their Net under DP-SGD (Opacus, hooks), as
    :mod:`securefl.privacy` wraps it."""
    from securefl.privacy.dp_sgd import DPSGDTrainer
    from securefl.privacy.ledger import PrivacyLedger

    base = local_trainer(_config(), _federation(), f"client-{site}")
    ledger = PrivacyLedger(ledger_path, delta=1e-5, budgets={"c": None})  # type: ignore[arg-type]
    return DPSGDTrainer(base.task(), client_id="c", ledger=ledger, noise_multiplier=0.5,
                        max_grad_norm=1.0)


def test_dp_sgd_draws_the_masks_from_the_site_generator(tmp_path):
    """Under Opacus the masks still come from the site's own generator: the same site
    trained twice gives the same noisy update, another site (same images and batches,
    other masks and noise) another, and torch's global RNG is never drawn from."""
    start = flatten(build_model(THEIRS, (1, 28, 28), 10, seed=0))
    before = torch.random.get_rng_state()
    first = _dp_sgd(0, tmp_path / "a.db").fit(start, round=0)[0].delta  # type: ignore[attr-defined]
    again = _dp_sgd(0, tmp_path / "b.db").fit(start, round=0)[0].delta  # type: ignore[attr-defined]
    other = _dp_sgd(1, tmp_path / "c.db").fit(start, round=0)[0].delta  # type: ignore[attr-defined]
    assert torch.equal(torch.random.get_rng_state(), before)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first).max() > 0 and not np.array_equal(first, other)


def _shared(period: int) -> object:
    return config_from_dict({"model": {"name": "mnist_cnn", "variant": "karimireddy2022",
                                       "dropout_masks": "shared", "mask_period": period},
                             "client": {"batch_size": 8, "lr": 0.1, "local_steps": 1}})


def test_shared_masks_are_the_same_at_every_site_within_a_period():
    """``dropout_masks = "shared"``: every site draws the masks of ``(seed, round //
    mask_period)``, as their simulator gives every worker the same masks for 30 iterations;
    one site with one image per batch trains exactly as another with the same image."""
    data = _federation()
    trainers = [local_trainer(_shared(3), data, f"client-{i}") for i in range(2)]  # type: ignore[arg-type]
    x = torch.ones(16, 64, 1, 1)

    def masks(trainer: LocalTrainer, round: int) -> torch.Tensor:
        trainer.begin_round(round)
        return trainer.model.features[4](x)

    first = [masks(t, 0) for t in trainers]
    assert torch.equal(first[0], first[1])
    assert torch.equal(masks(trainers[0], 2), first[0])  # rounds 0, 1, 2: one period
    assert not torch.equal(masks(trainers[0], 3), first[0])
    assert torch.equal(masks(trainers[1], 3), masks(trainers[0], 3))
    own = local_trainer(_config(), data, "client-0")  # type: ignore[arg-type]
    own.begin_round(0)
    assert not torch.equal(own.model.features[4](x), first[0])  # per-site masks differ
    one = {f"client-{i}": ClientData(_images(1, 0), _images(1, 2)) for i in range(2)}
    single = FederatedData(one, _images(1, 1), 10, (1, 28, 28))
    start = flatten(build_model(THEIRS, (1, 28, 28), 10, seed=0))
    a, b = (local_trainer(_shared(30), single, f"client-{i}").fit(start, round=4)[0].delta  # type: ignore[arg-type]
            for i in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("table,message", [
    ({"name": "mnist_cnn", "dropout_masks": "shared"},
     "[model] dropout_masks = 'shared' needs a model with dropout"),
    ({"name": "mnist_cnn", "variant": "karimireddy2022", "mask_period": 0},
     "[model] mask_period must be >= 1, got 0")])
def test_shared_masks_settings_are_checked(tmp_path, table, message):
    path = tmp_path / "run.toml"
    path.write_text("[model]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                          for k, v in table.items()))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
