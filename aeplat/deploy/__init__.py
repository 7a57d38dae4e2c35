"""Load a registered aeplat model and score images with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_error_map_model(model_uri: str, dst_path: Path | None = None) -> torch.nn.Module:
    """Load a model logged by aeplat, for example `models:/brats-flair@champion`.

    The model maps images (N, 1, H, W) in [0, 1] to per-pixel squared reconstruction errors of
    the same shape. Pass `dst_path` to keep the downloaded files out of the temporary folder.
    """
    import mlflow.pytorch

    if dst_path is not None:
        dst_path.mkdir(parents=True, exist_ok=True)
    return mlflow.pytorch.load_model(model_uri, dst_path=None if dst_path is None else str(dst_path))


def score_images(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-image anomaly scores (N,) and error maps (N, 1, H, W); higher means more abnormal."""
    with torch.no_grad():
        error_maps = model(torch.as_tensor(images, dtype=torch.float32))
    error_maps_array = error_maps.detach().cpu().numpy()
    return error_maps_array.reshape(len(error_maps_array), -1).mean(axis=1), error_maps_array
