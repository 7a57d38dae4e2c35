"""Detection metrics of anomaly scores, where a higher score means more abnormal.

Image level: ROC AUC and average precision (``image_metrics``). Pixel level: ROC AUC,
average precision and Dice over whole test sets in bounded memory (``BinnedPixelMetrics``).
"""

from __future__ import annotations

import math

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


# Pixels converted to float64 at a time inside BinnedPixelMetrics.update: 8 MiB per buffer.
_UPDATE_BLOCK_PIXELS = 2**20


class BinnedPixelMetrics:
    """Pixel-level ROC AUC, average precision and Dice from per-class score histograms.

    ``update`` adds score maps and their binary lesion masks (1 = abnormal pixel) to two
    histograms of ``num_bins`` equal bins over ``score_range``, so memory stays at
    2 · num_bins counts whatever the number of pixels. Scores below or above the range are
    counted in the first or last bin (``out_of_range_count`` counts them). The metrics
    treat every bin as one score, so pixels of both classes in the same bin count as ties:

    - ``auc`` is exact when no bin contains scores that differ, and otherwise off by at most
      ``auc_error_bound()``.
    - ``ap`` is average precision as scikit-learn defines it, sum over thresholds of
      (Rₙ - Rₙ₋₁) · Pₙ, with one threshold per bin edge.
    - ``best_dice`` returns the best Dice over the bin edges as thresholds (⌈Dice⌉), and
      ``dice_at`` returns the Dice at a given threshold, for example one chosen on the
      validation split.

    The default range [0, 1] fits squared reconstruction errors of images in [0, 1]. A
    pixel is predicted abnormal at threshold t when its score is >= t.
    """

    def __init__(self, num_bins: int = 100_000, score_range: tuple[float, float] = (0.0, 1.0)) -> None:
        low, high = (float(value) for value in score_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"score_range must be two finite numbers (low, high) with low < high, got {score_range}")

        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")

        self.num_bins = num_bins
        self.low = low
        self.high = high
        self.normal_counts = np.zeros(num_bins, dtype=np.int64)
        self.abnormal_counts = np.zeros(num_bins, dtype=np.int64)
        self.out_of_range_count = 0

    @property
    def bin_edges(self) -> np.ndarray:
        """Lower edges of the bins, (num_bins,) float64: the thresholds the metrics use."""
        return self.low + (self.high - self.low) * np.arange(self.num_bins) / self.num_bins

    def update(self, score_maps: np.ndarray, masks: np.ndarray) -> None:
        """Add score maps and their masks, two arrays of the same shape (for example (N, 1, H, W)).

        Masks hold 0 (normal) and 1 (abnormal) or booleans. Raises NonFiniteScoreError for
        a NaN or infinite score and ValueError for mismatched shapes or other mask values,
        before any count changes. Non-contiguous inputs are copied.
        """
        score_maps = np.asarray(score_maps)
        masks = np.asarray(masks)
        if score_maps.shape != masks.shape:
            raise ValueError(
                f"score_maps and masks must have the same shape, got {score_maps.shape} and {masks.shape}. "
                f"Pass one mask pixel per score pixel"
            )

        flat_scores = score_maps.reshape(-1)
        flat_masks = masks.reshape(-1)
        _check_pixel_inputs(flat_scores, flat_masks)

        for start in range(0, flat_scores.size, _UPDATE_BLOCK_PIXELS):
            stop = start + _UPDATE_BLOCK_PIXELS
            self._add_block(flat_scores[start:stop], flat_masks[start:stop])

    def auc(self) -> float:
        """Return the pixel ROC AUC, counting ties (same bin) as one half.

        Raises UndefinedMetricError when no abnormal or no normal pixel was added.
        """
        positives, negatives = self._class_totals(need_negatives=True)
        normal_below = np.cumsum(self.normal_counts) - self.normal_counts
        pairs_won = np.dot(self.abnormal_counts.astype(np.float64), normal_below + 0.5 * self.normal_counts)
        return float(pairs_won / (float(positives) * float(negatives)))

    def auc_error_bound(self) -> float:
        """Return the largest possible difference between ``auc`` and the exact AUC of the raw scores.

        Only pairs of pixels of different classes in the same bin can be ordered wrongly,
        and each such pair counts one half, so the bound is half their share of all pairs.
        """
        positives, negatives = self._class_totals(need_negatives=True)
        shared = np.dot(self.abnormal_counts.astype(np.float64), self.normal_counts.astype(np.float64))
        return float(0.5 * shared / (float(positives) * float(negatives)))

    def ap(self) -> float:
        """Return the pixel average precision. Raises UndefinedMetricError when no abnormal pixel was added."""
        positives, _ = self._class_totals(need_negatives=False)
        true_positives, false_positives = self._counts_at_or_above()

        predicted = true_positives + false_positives
        precision = np.divide(true_positives, predicted, out=np.ones(self.num_bins), where=predicted > 0)
        recall_gain = self.abnormal_counts / positives
        return float(np.dot(recall_gain, precision))

    def best_dice(self) -> tuple[float, float]:
        """Return the best pixel Dice over all bin edges as thresholds, and that threshold.

        Ties go to the highest threshold. Raises UndefinedMetricError when no abnormal pixel
        was added.
        """
        dice = self._dice_per_threshold()
        best = int(self.num_bins - 1 - np.argmax(dice[::-1]))
        return float(dice[best]), float(self.bin_edges[best])

    def dice_at(self, threshold: float) -> float:
        """Return the pixel Dice when pixels with score >= threshold are predicted abnormal.

        The threshold is rounded up to the next bin edge, so it is exact for thresholds
        returned by ``best_dice`` of an accumulator with the same bins. Raises
        UndefinedMetricError when no abnormal pixel was added.
        """
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")

        dice = self._dice_per_threshold()
        first_bin = math.ceil((threshold - self.low) * self.num_bins / (self.high - self.low))
        if first_bin >= self.num_bins:
            return 0.0
        return float(dice[max(first_bin, 0)])

    def _add_block(self, scores: np.ndarray, masks: np.ndarray) -> None:
        # Bin positions are computed in place in one float64 buffer to keep passes and memory low.
        positions = scores.astype(np.float64)
        np.subtract(positions, self.low, out=positions)
        np.multiply(positions, self.num_bins / (self.high - self.low), out=positions)
        self.out_of_range_count += int(np.count_nonzero(positions < 0)) + int(np.count_nonzero(positions > self.num_bins))

        # After clipping to [0, num_bins - 1], truncation to an integer is the floor.
        np.clip(positions, 0, self.num_bins - 1, out=positions)
        bins = positions.astype(np.intp)
        # One bincount for both classes: abnormal pixels land in the upper half.
        bins[masks.astype(np.bool_)] += self.num_bins
        counts = np.bincount(bins, minlength=2 * self.num_bins)

        self.normal_counts += counts[: self.num_bins]
        self.abnormal_counts += counts[self.num_bins :]

    def _class_totals(self, need_negatives: bool) -> tuple[int, int]:
        positives = int(self.abnormal_counts.sum())
        negatives = int(self.normal_counts.sum())
        if positives == 0:
            raise UndefinedMetricError(
                f"no abnormal pixel among the {negatives} pixels added, so pixel metrics are undefined. "
                f"Pass masks of images with lesions"
            )

        if need_negatives and negatives == 0:
            raise UndefinedMetricError(
                f"all {positives} pixels added are abnormal, so the pixel AUC is undefined. "
                f"Pass images with normal pixels too"
            )
        return positives, negatives

    def _counts_at_or_above(self) -> tuple[np.ndarray, np.ndarray]:
        """Return true and false positives (float64, per bin) when bins >= that bin are predicted abnormal."""
        true_positives = np.cumsum(self.abnormal_counts[::-1])[::-1].astype(np.float64)
        false_positives = np.cumsum(self.normal_counts[::-1])[::-1].astype(np.float64)
        return true_positives, false_positives

    def _dice_per_threshold(self) -> np.ndarray:
        positives, _ = self._class_totals(need_negatives=False)
        true_positives, false_positives = self._counts_at_or_above()
        # Dice = 2 TP / (2 TP + FP + FN), and TP + FN is the number of abnormal pixels.
        return 2.0 * true_positives / (true_positives + false_positives + positives)


def _check_pixel_inputs(scores: np.ndarray, masks: np.ndarray) -> None:
    non_finite = scores.size - int(np.count_nonzero(np.isfinite(scores)))
    if non_finite:
        raise NonFiniteScoreError(
            f"{non_finite} of {scores.size} pixel scores are NaN or infinite, so the model diverged. "
            f"Lower the learning rate or the entropy weight, or discard this model"
        )

    if masks.dtype != np.bool_:
        invalid = (masks != 0) & (masks != 1)
        if invalid.any():
            unexpected = np.unique(masks[invalid])
            raise ValueError(f"masks must contain only 0 and 1, got also {unexpected.tolist()[:10]}")
