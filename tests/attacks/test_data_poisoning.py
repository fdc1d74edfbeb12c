"""Label flipping and the pixel-trigger backdoor on small hand-made datasets."""

from __future__ import annotations

import numpy as np
import pytest

from securefl.attacks.data_poisoning import LabelFlip, PixelTrigger
from securefl.data import Dataset
from securefl.errors import DataError


def images(n: int = 40, classes: int = 4) -> Dataset:
    rng = np.random.default_rng(0)
    features = rng.random((n, 1, 6, 6)).astype(np.float32) * 0.5
    return Dataset(features, np.arange(n, dtype=np.int64) % classes, classes, "toy")


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    data = images()
    flipped = LabelFlip()(data, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(flipped.labels, 3 - data.labels)
    np.testing.assert_array_equal(flipped.features, data.features)
    np.testing.assert_array_equal(data.labels, np.arange(40) % 4)  # input untouched


def test_label_flip_fraction_and_targeted_flip() -> None:
    data = images()
    half = LabelFlip(fraction=0.5)(data, rng=np.random.default_rng(0))
    assert int((half.labels != data.labels).sum()) == 20
    targeted = LabelFlip(source=1, target=2)(data, rng=np.random.default_rng(0))
    changed = targeted.labels != data.labels
    assert set(data.labels[changed]) == {1} and set(targeted.labels[changed]) == {2}
    assert int(changed.sum()) == 10


def test_label_flip_validates() -> None:
    with pytest.raises(ValueError, match="together"):
        LabelFlip(source=1)
    with pytest.raises(ValueError, match="differ"):
        LabelFlip(source=1, target=1)
    with pytest.raises(ValueError, match="fraction"):
        LabelFlip(fraction=0.0)
    with pytest.raises(DataError, match="outside"):
        LabelFlip(source=0, target=9)(images(), rng=np.random.default_rng(0))


def test_pixel_trigger_stamps_and_relabels_the_chosen_fraction() -> None:
    data = images()
    trigger = PixelTrigger(target=2, size=2, value=1.0, fraction=0.25)
    poisoned = trigger(data, rng=np.random.default_rng(1))
    patched = (poisoned.features[:, :, -2:, -2:] == 1.0).all(axis=(1, 2, 3))
    assert int(patched.sum()) == 10
    assert (poisoned.labels[patched] == 2).all()
    np.testing.assert_array_equal(poisoned.labels[~patched], data.labels[~patched])
    np.testing.assert_array_equal(poisoned.features[~patched], data.features[~patched])
    # only the patch changed on the patched images
    np.testing.assert_array_equal(poisoned.features[patched][:, :, :4, :],
                                  data.features[patched][:, :, :4, :])


def test_triggered_test_drops_the_target_class_and_keeps_true_labels() -> None:
    data = images()
    trigger = PixelTrigger(target=0)
    test = trigger.triggered_test(data)
    assert len(test) == 30 and 0 not in set(test.labels)
    assert (test.features[:, :, -2:, -2:] == 1.0).all()


def test_success_rate_is_the_fraction_predicted_as_target() -> None:
    trigger = PixelTrigger(target=3)
    assert trigger.success_rate(np.array([3, 3, 1, 0])) == 0.5
    with pytest.raises(ValueError, match="no triggered"):
        trigger.success_rate(np.array([]))


def test_pixel_trigger_validates() -> None:
    with pytest.raises(ValueError, match="size"):
        PixelTrigger(size=0)
    with pytest.raises(DataError, match="images"):
        PixelTrigger().stamp(np.zeros((3, 30), np.float32))
    with pytest.raises(DataError, match="outside"):
        PixelTrigger(target=7)(images(), rng=np.random.default_rng(0))
