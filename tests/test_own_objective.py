"""A site's own loss and training step (securefl.objective), with DP-SGD's contract checked."""

from __future__ import annotations

import json
import textwrap
import tomllib

import numpy as np
import pytest
import torch
from torch import nn

from securefl import own
from securefl.config import config_from_dict, load_config
from securefl.errors import ConfigError
from securefl.simulation import run_simulation

DP = {"privacy": {"mode": "dp_sgd", "target_epsilon": 8.0, "delta": 1e-3}}


def table(rows: int = 600, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 20))
    return x, (x[:, :5].sum(axis=1) > 0).astype(np.int64)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 2))


def smoothed(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy: a mean of per-example losses."""
    return nn.functional.cross_entropy(outputs, labels, label_smoothing=0.1)


def coupled(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the spread of the logits around the batch mean: couples examples."""
    spread = (outputs - outputs.mean(dim=0)).pow(2).sum(dim=1).mean()
    return nn.functional.cross_entropy(outputs, labels) + spread


def config(**sections):
    base = {"run": {"rounds": 3}, "data": {"num_clients": 3, "partition": "iid"},
            "client": {"lr": 0.2, "batch_size": 32}}
    return config_from_dict({**base, **sections})


@pytest.mark.slow
def test_own_loss_and_step_train_under_dp_sgd_and_secagg_and_are_recorded(tmp_path):
    calls = []

    def step(net, features, labels, loss):
        calls.append(len(labels))
        return loss(net(features), labels)

    x, y = table(1200)
    cfg = config(run={"rounds": 5}, client={"lr": 0.3, "batch_size": 32},
                 protection={"kind": "secagg", "secagg": {"clip": 1.0, "max_weight": 1000.0}},
                 **DP)
    result = own.run(cfg, model=model(), data=x, labels=y, loss=smoothed, step=step,
                     out_dir=tmp_path)
    assert not any(r.aborted for r in result.history.rounds)
    assert result.history.final.accuracy > 0.65
    assert len(calls) > 5 * 3  # every client, every round, every Poisson batch
    recorded = tomllib.loads((tmp_path / "config.toml").read_text())["client"]
    assert recorded["loss"] == "python:tests.test_own_objective.smoothed"
    assert recorded["step"].startswith("python:tests.test_own_objective.")
    training = json.loads((tmp_path / "provenance.json").read_text())["training"]
    assert training["loss"] == recorded["loss"] and training["step"] == recorded["step"]


def test_the_default_objective_is_recorded_as_built_in(tmp_path):
    x, y = table(200)
    own.run(config(run={"rounds": 1}), model=model(), data=x, labels=y, out_dir=tmp_path)
    training = json.loads((tmp_path / "provenance.json").read_text())["training"]
    assert training == {"loss": "built-in cross-entropy",
                        "step": "built-in loss(model(features), labels)"}


def test_a_loss_that_couples_examples_is_refused_by_dp_sgd_only():
    x, y = table(200)
    with pytest.raises(ConfigError, match=r"DP-SGD needs a loss that is the mean of "
                                          r"per-example losses: on two examples it gave") as e:
        own.run(config(**DP), model=model(), data=x, labels=y, loss=coupled)
    assert "\n" not in str(e.value)
    plain = own.run(config(run={"rounds": 1}), model=model(), data=x, labels=y, loss=coupled)
    assert np.isfinite(plain.parameters).all()


def test_reduction_sum_is_told_to_opacus_and_a_hidden_sum_is_refused():
    x, y = table(200)
    summed = nn.CrossEntropyLoss(reduction="sum")
    result = own.run(config(run={"rounds": 1}, client={"lr": 0.005}, **DP), model=model(),
                     data=x, labels=y, loss=summed)
    assert np.isfinite(result.parameters).all()

    def hidden_sum(outputs, labels):
        return nn.functional.cross_entropy(outputs, labels, reduction="sum")

    with pytest.raises(ConfigError, match=r"their single losses .* have mean"):
        own.run(config(**DP), model=model(), data=x, labels=y, loss=hidden_sum)
    with pytest.raises(ConfigError, match=r"reduction = 'none'"):
        own.run(config(), model=model(), data=x, labels=y,
                loss=nn.CrossEntropyLoss(reduction="none"))


def test_a_step_must_return_a_scalar_and_ghost_takes_the_built_ins(caplog):
    x, y = table(200)
    result = own.run(config(run={"rounds": 1}), model=model(), data=x, labels=y,
                     step=lambda net, f, lab, loss: nn.functional.cross_entropy(
                         net(f), lab, reduction="none"))
    assert result.history.rounds[0].aborted is not None  # every client failed the same way
    failed = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert sorted(m.split()[1] for m in failed) == ["client-0", "client-1", "client-2"]
    assert all(m.endswith("the training step must return the batch's loss as a scalar "
                          "tensor, got (32,)") for m in failed)
    ghost = {"privacy": {**DP["privacy"], "grad_sample_mode": "ghost"}}
    with pytest.raises(ConfigError, match=r"grad_sample_mode = \"ghost\" wraps Opacus's own"):
        own.run(config(**ghost), model=model(), data=x, labels=y, loss=smoothed)


def test_toml_loss_by_import_path_from_the_config_folder(tmp_path):
    (tmp_path / "sitecode.py").write_text(textwrap.dedent("""
        import torch

        def focal(outputs, labels):
            logp = torch.log_softmax(outputs, dim=1).gather(1, labels[:, None])[:, 0]
            return (-(1 - logp.exp()) ** 2 * logp).mean()
    """))
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent("""
        [run]
        rounds = 2
        [data]
        dataset = "breast_cancer"
        num_clients = 3
        partition = "iid"
        [client]
        lr = 0.2
        loss = "sitecode:focal"
        [privacy]
        mode = "dp_sgd"
        target_epsilon = 8.0
        delta = 1e-3
    """))
    result = run_simulation(load_config(path), out_dir=tmp_path / "out")
    assert result.history.final.accuracy > 0.8
    training = json.loads((tmp_path / "out" / "provenance.json").read_text())["training"]
    assert training["loss"] == "sitecode:focal"
    path.write_text(path.read_text().replace("sitecode:focal", "sitecode:absent"))
    with pytest.raises(ConfigError, match=r"\[client\] loss 'sitecode:absent': 'sitecode' has "
                                          r"no 'absent'"):
        run_simulation(load_config(path))
    path.write_text(path.read_text().replace("sitecode:absent", "not a path"))
    with pytest.raises(ConfigError, match=r"\[client\] loss must be \"package.module:function"):
        load_config(path)
    recorded = path.read_text().replace("not a path", "python:tests.x.smoothed")
    path.write_text(recorded)
    with pytest.raises(ConfigError, match=r"records a loss given as a Python object"):
        run_simulation(load_config(path))
