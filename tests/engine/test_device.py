"""``[run] device``: the selection logic (CUDA mocked), the CPU path, and a GPU run where one
is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securefl.build import local_trainer
from securefl.config import config_from_dict
from securefl.data import federate
from securefl.device import select_device
from securefl.errors import ConfigError

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(("setting", "available", "expected"), [
    ("cpu", False, "cpu"), ("cpu", True, "cpu"), ("auto", False, "cpu"),
    ("auto", True, "cuda"), ("cuda", True, "cuda")])
def test_selection(monkeypatch, setting, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert select_device(setting).type == expected


def test_cuda_without_a_gpu_is_one_config_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r'^\[run\] device = "cuda", but torch finds no CUDA '
                                          r'device') as info:
        select_device("cuda")
    assert "\n" not in str(info.value)
    config = config_from_dict({"run": {"device": "cuda"}, "data": {"num_clients": 2}})
    with pytest.raises(ConfigError, match=r"\[run\] device = \"cuda\""):
        local_trainer(config, federate(config.data, seed=0), "client-0")


def test_unknown_device_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"\[run\] device"):
        config_from_dict({"run": {"device": "gpu"}})
    assert config_from_dict({}).run.device == "cpu"


def _update(device: str, *, privacy: bool = False) -> np.ndarray:
    table = {"run": {"device": device}, "data": {"num_clients": 2},
             "model": {"name": "mlp", "hidden": [16]}, "client": {"batch_size": 16}}
    config = config_from_dict(table)
    data = federate(config.data, seed=0)
    trainer = local_trainer(config, data, "client-0")
    from securefl.vector import flatten

    start = flatten(trainer.model)
    if privacy:
        from securefl.privacy.dp_sgd import DPSGDTrainer
        from securefl.privacy.ledger import PrivacyLedger

        trainer = DPSGDTrainer(trainer.task(), client_id="client-0",
                               ledger=PrivacyLedger(":memory:", delta=1e-5),
                               # noise far below float32 resolution: the CUDA generator's
                               # stream differs from the CPU's, the sampled batches do not
                               noise_multiplier=1e-9, max_grad_norm=1.0)
    update, _ = trainer.fit(start, round=1)
    assert update.delta.dtype == np.float32 and np.isfinite(update.delta).all()
    return update.delta


def test_auto_without_a_gpu_trains_exactly_as_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    np.testing.assert_array_equal(_update("auto"), _update("cpu"))


@pytest.mark.skipif(not CUDA, reason="no CUDA device here")
@pytest.mark.parametrize("privacy", [False, True], ids=["sgd", "dp_sgd"])
def test_gpu_training_matches_the_cpu(privacy):
    gpu, cpu = _update("cuda", privacy=privacy), _update("cpu", privacy=privacy)
    assert np.abs(cpu).max() > 0
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
