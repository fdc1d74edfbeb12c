"""The independent reference loop of Karimireddy et al. 2022's exp3
(``attacks/reference/karimireddy_loop.py``: plain torch, their aggregators and attacks, none
of securefl's engine): on label-sorted mnist5k, coordinate-wise median under IPM stays at
the initial model's accuracy on securefl's [0, 1] pixels and learns with their input scaling
``(x - 0.1307) / 0.3081``, as the harness does (``karimireddy2022-normalized.toml``); their
CNN's dropout masks; the capture arithmetic of identical byzantine rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

LOOP = Path(__file__).resolve().parents[2] / "attacks" / "reference" / "karimireddy_loop.py"


def _loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("karimireddy_loop", LOOP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~11 s of CPU: two 60-round runs of 25 workers
def test_reference_median_under_ipm_learns_only_with_their_input_scaling() -> None:
    pytest.importorskip("mlxtend")
    loop = _loop()
    plain = loop.run(attack="ipm", rule="cm", seed=0, rounds=60, every=30)
    scaled = loop.run(attack="ipm", rule="cm", seed=0, rounds=60, every=30, normalize=True)
    assert plain["accuracy_curve"] == pytest.approx([0.121, 0.12], abs=0.01)
    assert scaled["accuracy_curve"] == pytest.approx([0.165, 0.191], abs=0.01)


def test_their_cnn_dropout_masks_drop_channels_then_units() -> None:
    """Their Net's Dropout2d(0.25) drops whole channels per example, Dropout2d(0.5) on the
    hidden layer single units; kept values are scaled by 1 / (1 - p)."""
    loop = _loop()
    first, second = loop.TheirNet.draw_masks(4000, torch.Generator().manual_seed(0))
    assert first.shape == (4000, 64, 1, 1) and second.shape == (4000, 128)
    assert first.unique().tolist() == pytest.approx([0.0, 4 / 3])
    assert second.unique().tolist() == [0.0, 2.0]
    assert float((first > 0).float().mean()) == pytest.approx(0.75, abs=0.005)
    assert float((second > 0).float().mean()) == pytest.approx(0.5, abs=0.005)
    net = loop.TheirNet()
    assert sum(p.numel() for p in net.parameters()) == 1_199_882
    x = torch.zeros((3, 1, 28, 28))
    assert net(x, (first[:3], second[:3])).shape == (3, 10)


def test_securefl_variant_computes_their_net() -> None:
    """``[model] name = "mnist_cnn", variant = "karimireddy2022"`` is the loop's ``TheirNet``:
    with the same weights and the same masks (both drawn as ``rand < 1 - p`` from equal
    generator states, channels first), the same logits, in training and in eval mode."""
    from securefl.config import ModelConfig
    from securefl.models import build_model, seed_dropout
    from securefl.vector import flatten, unflatten

    loop = _loop()
    theirs = loop.TheirNet()
    ours = build_model(ModelConfig(name="mnist_cnn", variant="karimireddy2022"),
                       (1, 28, 28), 10, seed=5)
    unflatten(theirs, flatten(ours))
    x = torch.rand((6, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    scaled = (x - 0.1307) / 0.3081
    seed_dropout(ours, torch.Generator().manual_seed(9))
    with torch.no_grad():
        masks = loop.TheirNet.draw_masks(6, torch.Generator().manual_seed(9))
        torch.testing.assert_close(ours.train()(x), theirs(scaled, masks))
        torch.testing.assert_close(ours.eval()(x), theirs(scaled))


def test_shared_masks_are_the_same_object_for_every_worker() -> None:
    """``shared`` (their simulator's saved and restored RNG): every call of an epoch gets the
    epoch's masks; ``independent``: a fresh draw per call; ``none``: no dropout."""
    loop = _loop()
    generator = torch.Generator().manual_seed(1)
    epoch = loop.TheirNet.draw_masks(32, generator)
    assert loop.next_masks("shared", epoch, 32, generator) is epoch
    assert loop.next_masks("none", epoch, 32, generator) is None
    fresh = loop.next_masks("independent", epoch, 32, generator)
    assert not torch.equal(fresh[1], epoch[1])


def _rows(byzantine: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    honest = torch.randn((20, 2000), generator=generator, dtype=torch.float64)
    if byzantine == "ipm":
        bad = (-0.1 * honest.mean(0)).repeat(5, 1)
    else:  # mimic: five copies of honest row 3
        bad = honest[3].repeat(5, 1)
    return torch.cat([honest, bad])


def test_capture_of_the_identical_ipm_rows() -> None:
    """20 nearly orthogonal rows and five copies of ``-0.1`` times their mean: the copies are
    Krum's choice (4 zero distances among their 18 nearest) and the exact geometric median
    (S, the norm of the sum of the unit vectors from them to the 20 others, is under 5)."""
    report = _loop().capture(_rows("ipm"), honest=20, f=5)
    assert report["krum_choice"] == "b"
    assert report["krum_best_at_b"] < 0.5 * report["krum_best_other"]
    assert report["gm_rows_at_b"] == 5
    assert report["gm_S"] == pytest.approx(4.83, abs=0.05)  # sqrt(20) = 4.47 if orthogonal
    assert report["gm_b_is_median"] is True
    assert report["rfa_byz_weight"] > 0.9


def test_capture_of_the_mimic_rows_is_not_the_median() -> None:
    """Five copies of an honest row: six rows at b, but the unit vectors from b to the other
    19 share b's component (cosines about 1/2), S about 13.6 > 6: b is not the median."""
    report = _loop().capture(_rows("mimic"), honest=20, f=5)
    assert report["gm_rows_at_b"] == 6
    assert report["krum_choice"] == "b"  # 5 zero distances among its 18 nearest
    assert report["gm_S"] == pytest.approx(13.6, abs=0.3)
    assert report["gm_b_is_median"] is False
