"""BinnedPixelMetrics against brute-force definitions, a known exact AUC and a memory bound."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from aeplat.trainers.metrics import BinnedPixelMetrics, NonFiniteScoreError, UndefinedMetricError


def pairwise_auc(scores: np.ndarray, masks: np.ndarray) -> float:
    """AUC by definition: the share of (abnormal, normal) pairs ordered right, ties counting one half."""
    positive = scores[masks == 1][:, None]
    negative = scores[masks == 0][None, :]
    return float(((positive > negative) + 0.5 * (positive == negative)).mean())


def definition_ap(scores: np.ndarray, masks: np.ndarray) -> float:
    """AP by definition: sum over distinct thresholds of recall gain times precision."""
    total = 0.0
    previous_recall = 0.0
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        true_positives = np.count_nonzero(predicted & (masks == 1))
        recall = true_positives / np.count_nonzero(masks == 1)
        total += (recall - previous_recall) * true_positives / np.count_nonzero(predicted)
        previous_recall = recall
    return total


def definition_dice(predicted: np.ndarray, masks: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(predicted & (masks == 1)) / (np.count_nonzero(predicted) + np.count_nonzero(masks == 1))


def quantised_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a 0.01 grid in [0, 1] (so ties exist), with masks that favour high scores."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((3, 1, 12, 12)) < 0.2).astype(np.uint8)
    scores = np.clip(rng.normal(0.4 + 0.2 * masks, 0.15), 0, 1).round(2).astype(np.float32)
    return scores, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_definition(seed: int) -> None:
    scores, masks = quantised_case(seed)
    metrics = BinnedPixelMetrics(num_bins=1000)

    metrics.update(scores, masks)

    assert metrics.auc() == pytest.approx(pairwise_auc(scores, masks), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_definition(seed: int) -> None:
    scores, masks = quantised_case(seed)
    metrics = BinnedPixelMetrics(num_bins=1000)

    metrics.update(scores, masks)

    assert metrics.ap() == pytest.approx(definition_ap(scores, masks), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_dice_matches_threshold_sweep(seed: int) -> None:
    scores, masks = quantised_case(seed)
    metrics = BinnedPixelMetrics(num_bins=1000)

    metrics.update(scores, masks)
    dice, threshold = metrics.best_dice()

    expected = max(definition_dice(scores >= value, masks) for value in np.unique(scores))
    assert dice == pytest.approx(expected, abs=1e-12)
    assert metrics.dice_at(threshold) == pytest.approx(definition_dice(scores >= threshold - 1e-9, masks), abs=1e-12)


def test_dice_at_validation_threshold() -> None:
    validation_scores, validation_masks = quantised_case(0)
    test_scores, test_masks = quantised_case(1)
    validation, test = BinnedPixelMetrics(num_bins=1000), BinnedPixelMetrics(num_bins=1000)
    validation.update(validation_scores, validation_masks)
    test.update(test_scores, test_masks)

    _, threshold = validation.best_dice()

    expected = definition_dice(test_scores >= threshold - 1e-9, test_masks)
    assert test.dice_at(threshold) == pytest.approx(expected, abs=1e-12)
    assert test.dice_at(2.0) == 0.0


def test_streaming_equals_one_update() -> None:
    scores, masks = quantised_case(3)
    whole, streamed = BinnedPixelMetrics(num_bins=1000), BinnedPixelMetrics(num_bins=1000)

    whole.update(scores, masks)
    for index in range(len(scores)):
        streamed.update(scores[index : index + 1], masks[index : index + 1])

    assert np.array_equal(whole.normal_counts, streamed.normal_counts)
    assert np.array_equal(whole.abnormal_counts, streamed.abnormal_counts)


def test_small_case_matches_exact_auc(shared_dir: Path) -> None:
    folder = shared_dir / "cases" / "metrics"
    arrays = np.load(folder / "pixel_auc_small.npz")
    expected = json.loads((folder / "pixel_auc_small.json").read_text())["exact_pixel_auc"]
    metrics = BinnedPixelMetrics(num_bins=10_000, score_range=(-5.0, 5.0))

    metrics.update(arrays["scores"], arrays["masks"])

    assert abs(metrics.auc() - expected) < 1e-3
    assert metrics.auc_error_bound() < 1e-3
    assert metrics.out_of_range_count == 0


def test_auc_error_bound_holds_for_coarse_bins() -> None:
    rng = np.random.default_rng(4)
    masks = (rng.random(5000) < 0.3).astype(np.uint8)
    scores = rng.normal(masks * 0.5, 1.0)
    metrics = BinnedPixelMetrics(num_bins=20, score_range=(-4.0, 4.0))

    metrics.update(scores, masks)

    assert abs(metrics.auc() - pairwise_auc(scores, masks)) <= metrics.auc_error_bound()


def test_streaming_large_set_has_bounded_memory() -> None:
    """3,700 maps of 256×256 (242 million pixels, 970 MB as float32) streamed in chunks of 100."""
    rng = np.random.default_rng(0)
    chunk_scores = rng.random((100, 1, 256, 256), dtype=np.float32)
    chunk_masks = (chunk_scores > 0.9).astype(np.uint8)
    metrics = BinnedPixelMetrics()

    tracemalloc.start()
    try:
        for _ in range(37):
            metrics.update(chunk_scores, chunk_masks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert metrics.normal_counts.sum() + metrics.abnormal_counts.sum() == 3700 * 256 * 256
    assert peak < 64 * 2**20
    assert metrics.auc() == pytest.approx(1.0, abs=1e-4)


def test_no_abnormal_pixel_raises() -> None:
    metrics = BinnedPixelMetrics()
    metrics.update(np.full((2, 1, 4, 4), 0.5), np.zeros((2, 1, 4, 4), dtype=np.uint8))

    for method in (metrics.auc, metrics.ap, metrics.best_dice):
        with pytest.raises(UndefinedMetricError, match="no abnormal pixel"):
            method()


def test_no_normal_pixel_raises_for_auc() -> None:
    metrics = BinnedPixelMetrics()
    metrics.update(np.full((1, 1, 4, 4), 0.5), np.ones((1, 1, 4, 4), dtype=np.uint8))

    with pytest.raises(UndefinedMetricError, match="pixel AUC is undefined"):
        metrics.auc()


def test_nan_scores_raise_before_counting() -> None:
    metrics = BinnedPixelMetrics()
    scores = np.full((1, 1, 4, 4), 0.5)
    scores[0, 0, 1, 1] = np.nan

    with pytest.raises(NonFiniteScoreError, match="1 of 16 pixel scores are NaN or infinite"):
        metrics.update(scores, np.zeros_like(scores, dtype=np.uint8))
    assert metrics.normal_counts.sum() == 0


@pytest.mark.parametrize(
    ("scores", "masks", "message"),
    [
        (np.zeros((1, 4, 4)), np.zeros((1, 1, 4, 4)), "same shape"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 2), "masks must contain only 0 and 1, got also \\[2\\]"),
    ],
)
def test_invalid_inputs_rejected(scores: np.ndarray, masks: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinnedPixelMetrics().update(scores, masks)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"num_bins": 0}, "num_bins must be an integer >= 1"), ({"score_range": (1.0, 1.0)}, "low < high")],
)
def test_invalid_settings_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinnedPixelMetrics(**arguments)
