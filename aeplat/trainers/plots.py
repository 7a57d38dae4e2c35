"""PNG figures of a trained model's validation results, drawn with matplotlib's Agg backend.

Every function takes arrays and writes one PNG file. Scores point one way everywhere:
higher means more abnormal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: trials and the search driver run headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from aeplat.trainers.loop import Trainer  # noqa: E402
from aeplat.trainers.metrics import ABNORMAL, NORMAL  # noqa: E402

logger = logging.getLogger(__name__)

RECONSTRUCTION_GRID_FILE = "reconstructions.png"
ROC_CURVE_FILE = "roc_curve.png"
SCORE_HISTOGRAM_FILE = "score_histograms.png"
AUC_BY_LATENT_SIZE_FILE = "val_auc_by_latent_dim.png"


def plot_reconstruction_grid(
    images: np.ndarray, reconstructions: np.ndarray, error_maps: np.ndarray, labels: np.ndarray, path: Path
) -> Path:
    """Write a grid with one column per image and rows input, reconstruction and error map.

    All three arrays have shape (N, C, H, W) and only channel 0 is drawn. Inputs and
    reconstructions share the grey scale [0, 1]. Error maps share one colour scale, from 0
    to the largest error in the grid, so brighter means more abnormal in every column.
    """
    _check_same_length(images=images, reconstructions=reconstructions, error_maps=error_maps, labels=labels)
    count = len(images)
    error_max = max(float(np.max(error_maps)), 1e-12)

    figure, axes = plt.subplots(3, count, figsize=(1.6 * count, 5.0), squeeze=False)
    rows = (("input", images, "gray", 1.0), ("reconstruction", reconstructions, "gray", 1.0), ("squared error", error_maps, "inferno", error_max))
    for row, (title, array, colormap, maximum) in enumerate(rows):
        for column in range(count):
            axis = axes[row][column]
            axis.imshow(array[column, 0], cmap=colormap, vmin=0.0, vmax=maximum)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(title)
            if row == 0:
                axis.set_title("abnormal" if labels[column] == ABNORMAL else "normal", fontsize=9)

    return _save(figure, path)


def plot_roc_curve(labels: np.ndarray, scores: np.ndarray, path: Path) -> Path:
    """Write the ROC curve of image scores (abnormal is the positive class), with its AUC in the legend."""
    _check_same_length(labels=labels, scores=scores)
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores, pos_label=ABNORMAL)
    auc = roc_auc_score(labels, scores)

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(false_positive_rate, true_positive_rate, label=f"AUC {auc:.3f}")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("validation ROC curve")
    axis.legend(loc="lower right")
    return _save(figure, path)


def plot_score_histograms(labels: np.ndarray, scores: np.ndarray, path: Path, bins: int = 40) -> Path:
    """Write overlaid histograms of the image scores of normal and abnormal images, on shared bins."""
    _check_same_length(labels=labels, scores=scores)
    edges = np.histogram_bin_edges(scores, bins=bins)

    figure, axis = plt.subplots(figsize=(5.5, 4.0))
    for label, name, colour in ((NORMAL, "normal", "tab:blue"), (ABNORMAL, "abnormal", "tab:red")):
        selected = scores[labels == label]
        axis.hist(selected, bins=edges, alpha=0.55, color=colour, label=f"{name} ({len(selected)})")
    axis.set_xlabel("anomaly score (mean squared error, higher is more abnormal)")
    axis.set_ylabel("images")
    axis.set_title("validation scores per class")
    axis.legend()
    return _save(figure, path)


def plot_auc_by_latent_size(latent_dims: np.ndarray, aucs: np.ndarray, entropy_weights: np.ndarray, path: Path) -> Path:
    """Write a scatter plot of validation AUC against latent size d, one point per trial, coloured by λ.

    The x axis is log2. Trials with λ = 0 are drawn as open circles, because a logarithmic
    colour scale has no place for 0.
    """
    _check_same_length(latent_dims=latent_dims, aucs=aucs, entropy_weights=entropy_weights)
    latent_dims = np.asarray(latent_dims, dtype=np.float64)
    aucs = np.asarray(aucs, dtype=np.float64)
    entropy_weights = np.asarray(entropy_weights, dtype=np.float64)
    penalised = entropy_weights > 0

    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    if np.any(~penalised):
        axis.scatter(latent_dims[~penalised], aucs[~penalised], facecolors="none", edgecolors="black", label="λ = 0")
    if np.any(penalised):
        points = axis.scatter(
            latent_dims[penalised],
            aucs[penalised],
            c=entropy_weights[penalised],
            cmap="viridis",
            norm=matplotlib.colors.LogNorm(),
            label="λ > 0",
        )
        figure.colorbar(points, ax=axis, label="entropy weight λ")

    axis.set_xscale("log", base=2)
    axis.set_xlabel("latent size d")
    axis.set_ylabel("best validation AUC")
    axis.set_title("validation AUC by latent size, one point per trial")
    axis.legend(loc="lower right")
    return _save(figure, path)


def write_validation_plots(
    trainer: Trainer,
    images: np.ndarray,
    labels: np.ndarray,
    folder: Path,
    examples_per_class: int = 4,
    scores: np.ndarray | None = None,
) -> list[Path]:
    """Write the reconstruction grid, ROC curve and score histograms of labelled validation images.

    scores are the images' anomaly scores from this trainer's model; without them the images
    are scored first. The grid shows up to ``examples_per_class`` normal and abnormal images,
    spread evenly over each class's images in their given order. Returns the paths of the
    three PNGs.
    """
    labels = np.asarray(labels)
    folder = Path(folder)
    if scores is None:
        scores = trainer.score(images)
    elif len(scores) != len(images):
        raise ValueError(f"got {len(scores)} scores for {len(images)} validation images; pass the scores of these images or none")

    chosen = np.concatenate([_spread_indices(np.flatnonzero(labels == label), examples_per_class) for label in (NORMAL, ABNORMAL)])
    examples = images[chosen]
    reconstructions = trainer.reconstruct(examples)
    error_maps = np.square(reconstructions - examples)

    return [
        plot_reconstruction_grid(examples, reconstructions, error_maps, labels[chosen], folder / RECONSTRUCTION_GRID_FILE),
        plot_roc_curve(labels, scores, folder / ROC_CURVE_FILE),
        plot_score_histograms(labels, scores, folder / SCORE_HISTOGRAM_FILE),
    ]


def _spread_indices(indices: np.ndarray, count: int) -> np.ndarray:
    if len(indices) <= count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, count).round().astype(int)]


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"the arrays to plot must be non-empty and of equal length, got lengths {lengths}")


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.debug("wrote %s", path)
    return path
