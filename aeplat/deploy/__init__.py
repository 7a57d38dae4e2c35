"""Load a registered aeplat model and score images with it.

A registered model is an MLflow pyfunc model (aeplat.deploy.pyfunc.AnomalyScoringModel) that
prepares images as training did and returns anomaly scores and error maps. It contains the
bare error-map network in MLflow's pt2 format, which load_error_map_model returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel


def load_scoring_model(model_uri: str, dst_path: Path | None = None) -> PyFuncModel:
    """Load a registered model as a pyfunc model, for example `models:/brats-flair@champion`.

    Its `predict` takes images as arrays, file bytes or base64 strings (see
    aeplat.deploy.inputs) and returns a dict with `score`, `error_map`, `input_index` and
    `slice_index` arrays. Pass `dst_path` to keep the downloaded files out of the temporary folder.
    """
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri, dst_path=_prepare_folder(dst_path))


def load_error_map_model(model_uri: str, dst_path: Path | None = None) -> torch.nn.Module:
    """Load the error-map network inside a registered aeplat model.

    The network maps model-ready images (N, 1, S, S) in [0, 1] to per-pixel squared
    reconstruction errors of the same shape. It does no preprocessing, so prefer
    load_scoring_model for images that are not yet at the model's image size.
    """
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    from aeplat.deploy.pyfunc import ERROR_MAP_ARTIFACT

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=_prepare_folder(dst_path)))
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts", {})
    if ERROR_MAP_ARTIFACT not in artifacts:
        raise ValueError(
            f"Model {model_uri} has no {ERROR_MAP_ARTIFACT!r} artifact, so aeplat did not log it as a scoring model. "
            "Register a model logged by `aeplat search`."
        )
    return mlflow.pytorch.load_model(str(local / artifacts[ERROR_MAP_ARTIFACT]["path"]))


def score_images(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-image anomaly scores (N,) and error maps (N, 1, S, S). Higher means more abnormal.

    `model` is a pyfunc model from load_scoring_model, which also resizes images to its size,
    or a network from load_error_map_model, which needs images of its size already.
    """
    if isinstance(model, torch.nn.Module):
        from aeplat.deploy.pyfunc import score_prepared_images

        return score_prepared_images(model, np.asarray(images, dtype=np.float32))

    output = model.predict(np.asarray(images, dtype=np.float32))
    return output["score"], output["error_map"]


def _prepare_folder(dst_path: Path | None) -> str | None:
    if dst_path is None:
        return None
    dst_path.mkdir(parents=True, exist_ok=True)
    return str(dst_path)
