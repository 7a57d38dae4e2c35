"""Draw an anomaly heatmap: the per-pixel error map over the model input, with a colour bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Opacity of the error map over the greyscale input.
OVERLAY_ALPHA = 0.55
FIGURE_SIZE_INCHES = (5.0, 4.2)
DPI = 100


def save_heatmap(path: Path, image: np.ndarray, error_map: np.ndarray, title: str) -> Path:
    """Write a PNG of `error_map` (S, S) drawn over `image` (S, S) in [0, 1] and return its path.

    The colour scale runs from 0 to the map's maximum squared error, so it differs between
    images, and the colour bar gives the values.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    axes = figure.add_subplot()
    axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")

    upper = max(float(np.max(error_map)), np.finfo(np.float32).tiny)
    overlay = axes.imshow(error_map, cmap="inferno", vmin=0.0, vmax=upper, alpha=OVERLAY_ALPHA, interpolation="nearest")
    colour_bar = figure.colorbar(overlay, ax=axes)
    colour_bar.set_label("squared reconstruction error")

    axes.set_title(title, fontsize=9)
    axes.set_axis_off()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path
