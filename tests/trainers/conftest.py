"""Synthetic images for the trainer tests: smooth Gaussian blobs on a dark background."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def make_blob_images(count: int, size: int, seed: int) -> np.ndarray:
    """Return float32 images (count, 1, size, size) in [0, 1], each with one to three Gaussian blobs."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((count, 1, size, size), dtype=np.float32)

    for image in images:
        for _ in range(rng.integers(1, 4)):
            centre_row, centre_column = rng.uniform(size / 8, size * 7 / 8, size=2)
            width = rng.uniform(size / 16, size / 5)
            amplitude = rng.uniform(0.3, 1.0)
            squared_distance = (rows - centre_row) ** 2 + (columns - centre_column) ** 2
            image[0] += amplitude * np.exp(-squared_distance / (2 * width**2))

    return np.clip(images, 0.0, 1.0)


def make_abnormal_images(count: int, size: int, seed: int) -> np.ndarray:
    """Return blob images with a high-contrast checkerboard square, which a blob autoencoder cannot reconstruct."""
    images = make_blob_images(count, size, seed)
    rng = np.random.default_rng(seed + 1)
    side = size // 4
    checkerboard = (np.indices((side, side)).sum(axis=0) % 2).astype(np.float32)

    for image in images:
        top, left = rng.integers(0, size - side, size=2)
        image[0, top : top + side, left : left + side] = checkerboard

    return images


@pytest.fixture
def blob_images() -> Callable[[int, int, int], np.ndarray]:
    return make_blob_images


@pytest.fixture
def abnormal_images() -> Callable[[int, int, int], np.ndarray]:
    return make_abnormal_images
