from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from aeplat.trainers.metrics import (
    NonFiniteScoreError,
    UndefinedMetricError,
    check_both_classes,
    image_metrics,
)

SHARED_METRIC_CASES = Path(__file__).resolve().parents[2] / ".." / "shared" / "cases" / "metrics"


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by its definition: the share of (abnormal, normal) pairs ranked correctly, ties counting 1/2."""
    abnormal = scores[labels == 1]
    normal = scores[labels == 0]

    wins = 0.0
    for positive in abnormal:
        for negative in normal:
            if positive > negative:
                wins += 1.0
            elif positive == negative:
                wins += 0.5

    return wins / (len(abnormal) * len(normal))


def threshold_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision by its definition: sum over thresholds of (recall gain) × precision."""
    total_abnormal = np.count_nonzero(labels == 1)

    average_precision = 0.0
    previous_recall = 0.0
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        true_positives = np.count_nonzero(predicted & (labels == 1))
        precision = true_positives / np.count_nonzero(predicted)
        recall = true_positives / total_abnormal
        average_precision += (recall - previous_recall) * precision
        previous_recall = recall

    return average_precision


def read_metric_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = SHARED_METRIC_CASES / name
    if not path.is_file():
        pytest.skip(f"shared metric case {path} is not available")

    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))

    labels = np.array([int(row["label"]) for row in rows], dtype=np.int64)
    scores = np.array([float(row["score"]) for row in rows], dtype=np.float64)
    return labels, scores


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    labels[:2] = [0, 1]
    # Rounding to one decimal produces many tied scores, also across the two classes.
    scores = np.round(rng.normal(size=60) + 0.7 * labels, 1)

    metrics = image_metrics(labels, scores)

    assert metrics["auc"] == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)
    assert metrics["ap"] == pytest.approx(threshold_average_precision(labels, scores), abs=1e-12)


def test_all_tied_scores_give_half_auc() -> None:
    labels = np.array([0, 0, 1, 1, 0])
    scores = np.full(5, 0.3)

    assert image_metrics(labels, scores)["auc"] == 0.5


def test_higher_scores_for_abnormal_give_perfect_auc() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])

    metrics = image_metrics(labels, scores)

    assert metrics["auc"] == 1.0
    assert metrics["ap"] == 1.0


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_rejected(bad_value: float) -> None:
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, bad_value, 0.2, bad_value])

    with pytest.raises(NonFiniteScoreError, match="2 of 4 anomaly scores are NaN or infinite"):
        image_metrics(labels, scores)


@pytest.mark.parametrize(("labels", "normal", "abnormal"), [([0, 0, 0], 3, 0), ([1, 1], 0, 2)])
def test_one_class_rejected(labels: list[int], normal: int, abnormal: int) -> None:
    with pytest.raises(UndefinedMetricError, match=f"{normal} normal and {abnormal} abnormal"):
        image_metrics(np.array(labels), np.linspace(0, 1, len(labels)))


def test_check_both_classes_names_split() -> None:
    with pytest.raises(UndefinedMetricError, match="the validation split has 4 normal and 0 abnormal images"):
        check_both_classes(np.zeros(4, dtype=np.int64), "validation")


def test_check_both_classes_accepts_both() -> None:
    check_both_classes(np.array([0, 1, 0]), "test")


def test_unexpected_labels_rejected() -> None:
    with pytest.raises(ValueError, match=r"got also \[2\]"):
        check_both_classes(np.array([0, 1, 2]), "validation")


def test_mismatched_shapes_rejected() -> None:
    with pytest.raises(ValueError, match=r"equal length, got shapes \(3,\) and \(4,\)"):
        image_metrics(np.array([0, 1, 0]), np.zeros(4))


def test_metric_errors_are_value_errors() -> None:
    assert issubclass(UndefinedMetricError, ValueError)
    assert issubclass(NonFiniteScoreError, ValueError)


def test_shared_one_class_split_rejected() -> None:
    labels, scores = read_metric_case("val_one_class_all_normal.csv")

    with pytest.raises(UndefinedMetricError, match=f"{len(labels)} normal and 0 abnormal"):
        check_both_classes(labels, "validation")
    with pytest.raises(UndefinedMetricError):
        image_metrics(labels, scores)


def test_shared_nan_scores_rejected() -> None:
    labels, scores = read_metric_case("val_nan_scores.csv")
    nan_count = int(np.count_nonzero(np.isnan(scores)))

    assert nan_count > 0
    with pytest.raises(NonFiniteScoreError, match=f"{nan_count} of {len(scores)} anomaly scores"):
        image_metrics(labels, scores)
