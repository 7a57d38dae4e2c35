"""Intensity normalisation and resizing of slices and masks."""

from __future__ import annotations

import numpy as np
import pytest

from aeplat.data import normalize_intensity
from aeplat.data.preprocess import axial_stack, resize_images, resize_masks


def brain_volume(seed: int = 0) -> np.ndarray:
    """A 20x20x4 volume: a 10x10 brain with intensities 100 to 200 on a zero background."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((20, 20, 4), dtype=np.float32)
    volume[5:15, 5:15, :] = rng.uniform(100, 200, size=(10, 10, 4))
    return volume


def test_outlier_does_not_squash_range() -> None:
    volume = brain_volume()
    volume[7, 7, 1] = 1e6

    normalized = normalize_intensity(volume, 0.5, 99.5)
    brain = normalized[5:15, 5:15, :]

    assert normalized[7, 7, 1] == 1.0
    assert 0.4 < np.median(brain) < 0.6
    assert brain.min() == 0.0


def test_background_stays_zero() -> None:
    normalized = normalize_intensity(brain_volume(), 0.5, 99.5)

    assert normalized[:5].max() == 0.0
    assert normalized.dtype == np.float32
    assert 0.0 <= normalized.min()
    assert normalized.max() <= 1.0


@pytest.mark.parametrize("value", [0.0, 250.0])
def test_constant_volume_gives_zeros(value: float) -> None:
    volume = np.full((6, 6, 3), value, dtype=np.float32)

    normalized = normalize_intensity(volume, 0.5, 99.5)

    assert not np.isnan(normalized).any()
    assert (normalized == 0).all()


def test_non_finite_voxels_ignored() -> None:
    volume = brain_volume()
    volume[6, 6, 0] = np.nan
    volume[8, 8, 0] = np.inf

    normalized = normalize_intensity(volume, 0.5, 99.5)

    assert np.isfinite(normalized).all()
    assert normalized[6, 6, 0] == 0.0
    assert normalized[8, 8, 0] == 0.0
    assert 0.4 < np.median(normalized[5:15, 5:15, 1]) < 0.6


def test_integer_volume_normalised() -> None:
    volume = np.zeros((4, 4, 1), dtype=np.int16)
    volume[1:3, 1:3, 0] = [[10, 20], [30, 40]]

    normalized = normalize_intensity(volume, 0.0, 100.0)

    assert normalized[1:3, 1:3, 0] == pytest.approx(np.array([[0.0, 1 / 3], [2 / 3, 1.0]]))


def test_axial_stack_puts_anterior_on_top() -> None:
    volume = np.zeros((3, 4, 2))
    volume[0, 3, 1] = 1.0

    stack = axial_stack(volume, np.array([1]))

    assert stack.shape == (1, 4, 3)
    assert stack[0, 0, 0] == 1.0
    assert stack.sum() == 1.0


def test_resized_images_in_unit_range() -> None:
    rng = np.random.default_rng(1)
    stack = rng.uniform(0, 1, size=(3, 48, 48)).astype(np.float32)

    resized = resize_images(stack, 16)

    assert resized.shape == (3, 1, 16, 16)
    assert resized.dtype == np.float32
    assert resized.min() >= 0.0
    assert resized.max() <= 1.0


def test_resize_averages_fine_stripes() -> None:
    stack = np.zeros((1, 64, 64), dtype=np.float32)
    stack[0, :, ::2] = 1.0

    resized = resize_images(stack, 16)

    # Antialiasing averages the stripes into grey in place of sampling one stripe colour.
    assert resized[0, 0, 4:12, 4:12] == pytest.approx(np.full((8, 8), 0.5), abs=0.05)


def test_mask_resize_thresholds_area() -> None:
    masks = np.zeros((2, 64, 64), dtype=np.uint8)
    masks[0, 0:4, 0:4] = 4
    masks[1, 0:2, 0:2] = 1

    resized = resize_masks(masks, 16)

    assert resized.dtype == np.uint8
    assert resized[0, 0].sum() == 1
    assert resized[0, 0, 0, 0] == 1
    assert resized[1, 0].sum() == 0


def test_empty_stack_resized() -> None:
    assert resize_images(np.zeros((0, 8, 8), np.float32), 16).shape == (0, 1, 16, 16)
    assert resize_masks(np.zeros((0, 8, 8), np.uint8), 16).shape == (0, 1, 16, 16)
