"""Image-level detection metrics of anomaly scores, where a higher score means more abnormal."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

NORMAL = 0
ABNORMAL = 1


class UndefinedMetricError(ValueError):
    """A metric is undefined because the labels contain only one class."""


class NonFiniteScoreError(ValueError):
    """Anomaly scores contain NaN or infinite values, usually because training diverged."""


def check_both_classes(labels: np.ndarray, split_name: str) -> None:
    """Raise UndefinedMetricError unless ``labels`` contain both normal (0) and abnormal (1) images.

    Also raises ValueError for labels other than 0 and 1.
    """
    labels = np.asarray(labels)
    _check_label_values(labels, split_name)

    abnormal = int(np.count_nonzero(labels == ABNORMAL))
    normal = int(labels.size) - abnormal
    if normal == 0 or abnormal == 0:
        raise UndefinedMetricError(
            f"the {split_name} split has {normal} normal and {abnormal} abnormal images, but AUC and "
            f"average precision need both classes. Assign patients with the missing class to the "
            f"{split_name} split or choose a different split seed"
        )


def image_metrics(labels: np.ndarray, scores: np.ndarray, split_name: str = "evaluated") -> dict[str, float]:
    """Return the ROC AUC (``auc``) and average precision (``ap``) of anomaly scores.

    Abnormal (label 1) is the positive class. Raises NonFiniteScoreError when a score is
    NaN or infinite, UndefinedMetricError when the labels contain one class only, and
    ValueError when the arrays are not 1-D of equal length. ``split_name`` only appears
    in error messages.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    _check_shapes(labels, scores)

    non_finite = int(np.count_nonzero(~np.isfinite(scores)))
    if non_finite:
        raise NonFiniteScoreError(
            f"{non_finite} of {scores.size} anomaly scores are NaN or infinite, so the model "
            f"diverged. Lower the learning rate or the entropy weight, or discard this trial"
        )

    check_both_classes(labels, split_name)

    return {
        "auc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores, pos_label=ABNORMAL)),
    }


def _check_shapes(labels: np.ndarray, scores: np.ndarray) -> None:
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of equal length, got shapes {labels.shape} "
            f"and {scores.shape}. Pass one label and one score per image"
        )


def _check_label_values(labels: np.ndarray, split_name: str) -> None:
    unexpected = np.setdiff1d(np.unique(labels), [NORMAL, ABNORMAL])
    if unexpected.size:
        raise ValueError(
            f"labels of the {split_name} split must be {NORMAL} (normal) or {ABNORMAL} (abnormal), "
            f"got also {unexpected.tolist()[:10]}"
        )
