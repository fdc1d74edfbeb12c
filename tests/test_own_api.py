"""The Python API for a site's own model and data (securefl.own), through the real engine."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from securefl import own
from securefl.config import config_from_dict
from securefl.data.own import as_dataset, from_torch
from securefl.errors import ConfigError, DataError
from securefl.models import own_model
from securefl.provenance import layout_record


def table(rows: int = 1200, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 20))  # float64, numpy's default
    return x, (x[:, :5].sum(axis=1) > 0).astype(np.int64)


def sequential() -> torch.nn.Sequential:
    torch.manual_seed(0)  # the test's own weights; the library never reads the global RNG
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def test_twenty_line_case_under_secagg_and_dp_sgd_records_what_was_trained(tmp_path):
    x, y = table()
    model = sequential()
    config = config_from_dict({
        "run": {"name": "mine", "rounds": 5},
        "data": {"num_clients": 5, "partition": "iid"},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.2},
        "protection": {"kind": "secagg", "secagg": {"clip": 1.0, "max_weight": 1000.0}},
        "privacy": {"mode": "dp_sgd", "target_epsilon": 8.0, "delta": 1e-3},
        "simulation": {"wire": True},
    })
    result = own.run(config, model=model, data=x, labels=y, out_dir=tmp_path)
    assert result.history.final.accuracy > 0.65
    assert not any(r.aborted for r in result.history.rounds)
    for name in ("config.toml", "provenance.json", "metrics.jsonl", "model.safetensors",
                 "summary.json", "privacy.json"):
        assert (tmp_path / name).is_file(), name
    recorded = tomllib.loads((tmp_path / "config.toml").read_text())
    assert recorded["model"]["name"] == "python"
    assert recorded["model"]["factory"] == "torch.nn.modules.container.Sequential"
    assert recorded["data"]["dataset"] == "python"
    assert recorded["data"]["num_clients"] == 5
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["model"]["layout_sha256"] == layout_record(model)[1]
    assert prov["model"]["parameters"] == 20 * 32 + 32 + 32 * 2 + 2
    assert len(prov["data"]["clients"]) == 5  # [data] num_clients honoured
    rows = sum(c["train_rows"] + c["val_rows"] for c in prov["data"]["clients"].values())
    assert rows + prov["data"]["test"]["rows"] == 1200
    assert prov["data"]["test"]["rows"] == 240  # test_fraction 0.2, stratified
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert len(privacy["clients"]) == 5
    # the user's module itself is untouched: every party trained a copy
    assert torch.equal(model[0].weight, sequential()[0].weight)


def test_recorded_config_is_refused_without_the_python_objects(tmp_path):
    x, y = table(200)
    config = config_from_dict({"run": {"rounds": 1}, "data": {"num_clients": 2}})
    recorded = own.recorded(config, sequential())
    from securefl.simulation import build_simulation

    with pytest.raises(DataError, match=r"dataset = \"python\".*securefl.own.run"):
        build_simulation(recorded)
    data = own.federation(config, x, labels=y)
    with pytest.raises(ConfigError, match=r"name = \"python\".*securefl.own.run"):
        build_simulation(recorded, data=data)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_num_clients_is_honoured_by_the_configured_partitioner(partition):
    x, y = table(600)
    config = config_from_dict({"data": {"num_clients": 7, "partition": partition}})
    fed = own.federation(config, x, labels=y)
    assert len(fed.clients) == 7
    assert sum(len(c.train) + len(c.val) for c in fed.clients.values()) == 480
    assert fed.test.features.dtype == np.float32 and fed.shape == (20,)


def test_torch_dataset_and_loader_give_the_same_data_as_arrays():
    x, y = table(100)
    tensors = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(tensors, batch_size=16, shuffle=False)
    direct = as_dataset(x, y, name="arrays")
    for source in (tensors, loader):
        got = from_torch(source, name="torch")
        np.testing.assert_array_equal(got.features, direct.features)
        np.testing.assert_array_equal(got.labels, direct.labels)
        assert got.features.dtype == np.float32 and got.labels.dtype == np.int64


def test_explicit_test_set_is_used_as_given():
    x, y = table(300)
    config = config_from_dict({"data": {"num_clients": 3, "partition": "iid"}})
    fed = own.federation(config, x[:250], labels=y[:250], test=(x[250:], y[250:]))
    assert len(fed.test) == 50
    np.testing.assert_array_equal(fed.test.labels, y[250:])


def test_factory_is_seeded_without_touching_the_global_rng():
    calls: list[tuple] = []

    def factory(in_shape, num_classes):
        calls.append((in_shape, num_classes))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_shape[0], num_classes))

    state = torch.random.get_rng_state()
    a = own_model(factory, (20,), 3, seed=5)
    b = own_model(factory, (20,), 3, seed=5)
    c = own_model(factory, (20,), 3, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert calls == [((20,), 3)] * 3
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


def test_float64_model_becomes_float32_and_a_wrong_head_is_one_line():
    double = torch.nn.Linear(20, 2).double()
    assert own_model(double, (20,), 2, seed=0).weight.dtype == torch.float32
    with pytest.raises(ConfigError, match=r"returns shape \(3,\) per example.*2 classes"):
        own_model(torch.nn.Linear(20, 3), (20,), 2, seed=0)
    with pytest.raises(ConfigError, match=r"does not accept inputs of shape \(20,\)"):
        own_model(torch.nn.Linear(7, 2), (20,), 2, seed=0)
    with pytest.raises(ConfigError, match=r"returned int, not a torch\.nn\.Module"):
        own_model(lambda: 3, (20,), 2, seed=0)


def test_bad_arrays_give_one_line_errors():
    x, y = table(50)
    cases = [
        (lambda: as_dataset(np.where(np.arange(20) == 3, np.nan, x), y, name="t",
                            columns=tuple(f"f{i}" for i in range(20))),
         r"t: column 'f3', row 0: missing or non-finite value"),
        (lambda: as_dataset(x, y + 0.5, name="t"), r"row 0: 0.5 is not an integer class code"),
        (lambda: as_dataset(x, y, name="t", num_classes=1 + 0 * y.max()),
         r"label 1 is out of range 0..0"),
        (lambda: as_dataset(x[:0], y[:0], name="t"), r"t: no rows"),
        (lambda: as_dataset(x, y[:-1], name="t"), r"50 feature rows but 49 labels"),
        (lambda: as_dataset(x.astype(str), y, name="t"), r"features must be numbers"),
        (lambda: as_dataset(x, -y, name="t"), r"label -1 is out of range"),
    ]
    for make, pattern in cases:
        with pytest.raises(DataError, match=pattern) as info:
            make()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra", [
    {"protection": {"kind": "he", "he": {"poly_modulus_degree": 4096,
                                         "coeff_modulus_bits": [40, 30], "scale_bits": 25}}},
    {"privacy": {"mode": "dp_fedavg", "noise_multiplier": 0.5, "clip_norm": 1.0}},
    {"aggregation": {"rule": "trimmed_mean", "beta": 0.1}},
], ids=["he", "dp_fedavg", "trimmed_mean"])
def test_own_model_runs_under_every_protection_unchanged(extra):
    x, y = table(600)
    config = config_from_dict({"run": {"rounds": 2}, "client": {"lr": 0.2},
                               "data": {"num_clients": 10, "partition": "iid"}, **extra})
    result = own.run(config, model=sequential(), data=x, labels=y)
    assert [len(r.clients) for r in result.history.rounds] == [10, 10]
    assert not any(r.aborted for r in result.history.rounds)
    assert 0.0 <= result.history.final.accuracy <= 1.0
