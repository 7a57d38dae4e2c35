"""Pixel-level metrics of a trained autoencoder on a split with lesion masks, in bounded memory."""

from __future__ import annotations

import numpy as np

from aeplat.trainers.loop import Trainer
from aeplat.trainers.metrics import BinnedPixelMetrics


def pixel_histograms(trainer: Trainer, images: np.ndarray, masks: np.ndarray, chunk: int = 256) -> BinnedPixelMetrics:
    """Stream the error maps of images (N, C, H, W) into pixel histograms, about ``chunk`` images at a time.

    masks has the shape of images, 1 for abnormal pixels. Memory stays at one chunk of error
    maps plus the histograms, whatever N is.
    """
    if images.shape != masks.shape:
        raise ValueError(f"images {images.shape} and masks {masks.shape} must have the same shape")

    histograms = BinnedPixelMetrics()
    # Equal parts of at least 2 images each, because the trainer scores at least 2 at a time.
    parts = np.array_split(np.arange(len(images)), max(1, -(-len(images) // chunk)))
    for index in parts:
        histograms.update(trainer.error_maps(images[index]), masks[index])
    return histograms


def pixel_metrics(
    trainer: Trainer,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    validation_images: np.ndarray,
    validation_masks: np.ndarray,
) -> dict[str, float]:
    """Return the test split's pixel AUC and AP, its best Dice over thresholds, and its Dice at the validation threshold.

    Keys: ``pixel_auc``, ``pixel_ap``, ``best_dice`` (the ⌈Dice⌉ of Cai et al., an upper bound
    because the threshold is chosen on the test split itself) and ``dice_at_val_threshold``
    (the threshold that maximises Dice on the validation split, applied to the test split).
    Raises UndefinedMetricError when either split has no abnormal pixel.
    """
    test = pixel_histograms(trainer, test_images, test_masks)
    validation = pixel_histograms(trainer, validation_images, validation_masks)
    best_dice, _ = test.best_dice()
    _, validation_threshold = validation.best_dice()
    return {
        "pixel_auc": test.auc(),
        "pixel_ap": test.ap(),
        "best_dice": best_dice,
        "dice_at_val_threshold": test.dice_at(validation_threshold),
    }
