import numpy as np
import pytest
import torch
from torch import nn

from securefl.config import ModelConfig
from securefl.models import build_model
from securefl.vector import Layout, flatten, unflatten


@pytest.mark.parametrize("name,shape", [("logistic", (30,)), ("mlp", (1, 8, 8)),
                                         ("cnn", (1, 8, 8)), ("cnn", (1, 28, 28)),
                                         ("cnn", (3, 32, 32)), ("mnist_cnn", (1, 28, 28))])
def test_round_trip_every_reference_model(name, shape):
    model = build_model(ModelConfig(name=name), shape, 10, seed=3)
    vector = flatten(model)
    layout = Layout.of(model)
    assert vector.dtype == np.float32 and vector.shape == (layout.size,)
    assert layout.size == sum(p.numel() for p in model.parameters())
    other = build_model(ModelConfig(name=name), shape, 10, seed=4)
    assert not np.array_equal(flatten(other), vector)
    unflatten(other, vector, layout)
    np.testing.assert_array_equal(flatten(other), vector)
    with torch.no_grad():
        x = torch.rand(2, *shape)
        torch.testing.assert_close(model(x), other(x))


def test_mnist_cnn_is_the_pytorch_example_network():
    """Karimireddy et al. 2022's MNIST model: conv 1->32 (320 parameters), conv 32->64
    (18,496), linear 9216->128 (1,179,776), linear 128->10 (1,290)."""
    from securefl.errors import ConfigError
    model = build_model(ModelConfig(name="mnist_cnn"), (1, 28, 28), 10, seed=0)
    assert [p.numel() for p in model.parameters()] == [288, 32, 18432, 64, 1179648, 128,
                                                       1280, 10]
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    with pytest.raises(ConfigError, match="28x28 MNIST network"):
        build_model(ModelConfig(name="mnist_cnn"), (1, 8, 8), 10, seed=0)


def test_layout_offsets_and_split():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    layout = Layout.of(model)
    assert [(s.name, s.shape, s.offset) for s in layout.specs] == [
        ("0.weight", (2, 3), 0), ("0.bias", (2,), 6), ("1.weight", (4, 2), 8),
        ("1.bias", (4,), 16)]
    vector = np.arange(20, dtype=np.float32)
    parts = layout.split(vector)
    np.testing.assert_array_equal(parts["1.weight"], np.arange(8, 16).reshape(4, 2))


def test_select_layers_by_glob():
    layout = Layout.of(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4)))
    np.testing.assert_array_equal(layout.select(["1.*"]), np.arange(8, 20))
    np.testing.assert_array_equal(layout.select(["0.bias", "1.bias"]),
                                  [6, 7, 16, 17, 18, 19])
    with pytest.raises(ValueError, match="matches no parameter"):
        layout.select(["2.*"])


def test_wrong_length_vector_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="layout needs"):
        unflatten(model, np.zeros(7, np.float32))


def test_same_seed_same_model():
    a = build_model(ModelConfig(name="mlp", hidden=(8,)), (4,), 3, seed=1)
    b = build_model(ModelConfig(name="mlp", hidden=(8,)), (4,), 3, seed=1)
    np.testing.assert_array_equal(flatten(a), flatten(b))


@pytest.mark.parametrize("name,shape,variant", [
    ("logistic", (30,), "plain"), ("mlp", (1, 8, 8), "plain"), ("cnn", (3, 32, 32), "plain"),
    ("mnist_cnn", (1, 28, 28), "plain"), ("mnist_cnn", (1, 28, 28), "karimireddy2022")])
def test_building_a_model_leaves_the_global_rng_alone(name, shape, variant):
    """The weights come from the seed alone: torch's global RNG neither sets them nor is
    advanced by building them (the layers' default initialisation is redrawn)."""
    config = ModelConfig(name=name, variant=variant)
    before = torch.random.get_rng_state()
    first = flatten(build_model(config, shape, 10, seed=5))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(12345)
    np.testing.assert_array_equal(flatten(build_model(config, shape, 10, seed=5)), first)
