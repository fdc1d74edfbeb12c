"""Gradient inversion cores: gradient recovery, iDLG labels, DLG / Inverting Gradients on a
single digits image, PSNR / SSIM, the PNG grid."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from securefl.attacks.inversion import (
    DLG,
    InvertingGradients,
    best_match,
    gradients_from_update,
    psnr,
    recover_labels,
    save_grid,
    ssim,
    total_variation,
)
from securefl.config import ModelConfig
from securefl.data.datasets import load_digits
from securefl.models import build_model
from securefl.vector import flatten


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _gradients(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def test_gradients_from_update_inverts_one_sgd_step(digits) -> None:
    model = build_model(ModelConfig(name="mlp", hidden=(16,)), (1, 8, 8), 10, seed=0)
    before = flatten(model)
    expected = _gradients(model, digits.features[:1], digits.labels[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for p, g in zip(model.parameters(), expected, strict=True):
        p.grad = g.clone()
    optimizer.step()
    recovered = gradients_from_update(flatten(model) - before, model, lr=0.05)
    for r, e in zip(recovered, expected, strict=True):
        torch.testing.assert_close(r, e, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        gradients_from_update(np.zeros(3), model, lr=0.0)


@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_idlg_recovers_every_label(digits, name: str) -> None:
    model = build_model(ModelConfig(name=name, hidden=(32,)), (1, 8, 8), 10, seed=1)
    for index in range(20):
        x, y = digits.features[index:index + 1], digits.labels[index:index + 1]
        label = recover_labels(_gradients(model, x, y), model)
        assert int(label[0]) == int(y[0])


def test_idlg_without_bias_uses_weight_rows(digits) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False))
    hits = sum(int(recover_labels(_gradients(model, digits.features[i:i + 1],
                                             digits.labels[i:i + 1]), model)[0])
               == int(digits.labels[i]) for i in range(20))
    assert hits == 20  # inputs are >= 0, so the true row sum is the only negative one


def test_label_recovery_needs_a_linear_head() -> None:
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        recover_labels([torch.zeros(1)], torch.nn.ReLU())


def test_inverting_gradients_reconstructs_one_image(digits) -> None:
    model = build_model(ModelConfig(name="mlp", hidden=(64,)), (1, 8, 8), 10, seed=2)
    x, y = digits.features[5:6], digits.labels[5:6]
    attack = InvertingGradients(iterations=200)
    result = attack(model, _gradients(model, x, y), shape=(1, 8, 8), num_classes=10,
                    generator=torch.Generator().manual_seed(0))
    assert int(result.labels[0]) == int(y[0])
    assert psnr(x, result.images)[0] >= 20.0
    assert ssim(x, result.images)[0] > 0.9
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0


def test_dlg_and_idlg_reconstruct_one_image(digits) -> None:
    model = build_model(ModelConfig(name="mlp", hidden=(64,)), (1, 8, 8), 10, seed=3)
    x, y = digits.features[7:8], digits.labels[7:8]
    gradients = _gradients(model, x, y)
    options = {"shape": (1, 8, 8), "num_classes": 10}
    idlg = DLG(iterations=100)(model, gradients, labels=recover_labels(gradients, model),
                               generator=torch.Generator().manual_seed(0), **options)
    dlg = DLG(iterations=100)(model, gradients, generator=torch.Generator().manual_seed(0),
                              **options)
    assert psnr(x, idlg.images)[0] >= 20.0
    assert psnr(x, dlg.images)[0] >= 20.0
    assert int(dlg.labels[0]) == int(y[0])
    assert idlg.loss < 1e-6


def test_inversion_of_unrelated_noise_fails(digits) -> None:
    # a gradient that no image produces: the attack finds nothing close to the original
    model = build_model(ModelConfig(name="mlp", hidden=(64,)), (1, 8, 8), 10, seed=4)
    x, y = digits.features[9:10], digits.labels[9:10]
    generator = torch.Generator().manual_seed(1)
    noise = [torch.randn(g.shape, generator=generator) for g in _gradients(model, x, y)]
    result = InvertingGradients(iterations=100)(model, noise, shape=(1, 8, 8), num_classes=10,
                                                generator=generator)
    assert psnr(x, result.images)[0] < 12.0


def test_psnr_known_values() -> None:
    reference = np.zeros((2, 1, 4, 4))
    estimate = np.stack([np.full((1, 4, 4), 0.1), np.full((1, 4, 4), 0.01)])
    np.testing.assert_allclose(psnr(reference, estimate), [20.0, 40.0])
    assert psnr(reference[:1], reference[:1])[0] == np.inf
    assert psnr(reference[:1], estimate[:1], data_range=255)[0] == pytest.approx(
        20 * np.log10(255 / 0.1))


def test_ssim_properties() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 8, 8))
    assert ssim(image, image)[0] == pytest.approx(1.0)
    noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    noisier = np.clip(image + rng.normal(0, 0.4, image.shape), 0, 1)
    assert 1.0 > ssim(image, noisy)[0] > ssim(image, noisier)[0]
    assert ssim(image, 1 - image)[0] < 0.0  # inverted contrast is anti-correlated


def test_ssim_matches_the_formula_on_a_single_window() -> None:
    # a 7x7 image and a 7x7 Gaussian window: one position, computable by hand
    rng = np.random.default_rng(3)
    x, y = rng.random((1, 7, 7)), rng.random((1, 7, 7))
    axis = np.arange(7) - 3
    w = np.outer(np.exp(-axis ** 2 / 4.5), np.exp(-axis ** 2 / 4.5))
    w /= w.sum()
    mx, my = (w * x[0]).sum(), (w * y[0]).sum()
    vx, vy = (w * x[0] ** 2).sum() - mx ** 2, (w * y[0] ** 2).sum() - my ** 2
    cxy = (w * x[0] * y[0]).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(x, y)[0] == pytest.approx(expected)


def test_total_variation_of_a_step() -> None:
    image = torch.zeros(1, 1, 2, 2)
    image[..., :, 1] = 1.0
    # horizontal differences are all 1 (mean 1), vertical ones 0
    assert float(total_variation(image)) == pytest.approx(1.0)


def test_best_match_picks_the_closest_original() -> None:
    originals = np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))])
    index, value = best_match(originals, np.full((1, 4, 4), 0.9))
    assert index == 1 and value == pytest.approx(20.0)


def test_grid_png(tmp_path, digits) -> None:
    path = save_grid(tmp_path / "grid.png", digits.features[:3], digits.features[:3],
                     titles=["a", "b", "c"])
    image = matplotlib.image.imread(path)
    assert image.shape[1] > image.shape[0] * 1.2  # three columns, two rows
    with pytest.raises(ValueError, match="equal shapes"):
        save_grid(tmp_path / "bad.png", digits.features[:3], digits.features[:2])
