"""The MLflow pyfunc model that serves an aeplat autoencoder: images in, anomaly scores and error maps out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from aeplat.deploy.config import ServingConfig
from aeplat.deploy.inputs import InvalidInputError, prepare_images
from aeplat.trainers.scoring import image_scores

logger = logging.getLogger(__name__)

# Keys of the pyfunc model's artifacts.
ERROR_MAP_ARTIFACT = "error_map_model"
CONFIG_ARTIFACT = "serving_config"

# Output keys.
SCORE = "score"
ERROR_MAP = "error_map"
INPUT_INDEX = "input_index"
SLICE_INDEX = "slice_index"
IMAGE = "image"

# Request parameter that adds the prepared model input to the output, for drawing heatmaps.
INCLUDE_IMAGES_PARAM = "include_images"

# The file that MLflow runs to create the model when loading it (models from code, no pickle).
MODEL_CODE_PATH = Path(__file__).with_name("model_code.py")

# Images per forward pass, which bounds the memory of one request with a large volume.
BATCH_SIZE = 256


class AnomalyScoringModel(PythonModel):
    """Scores images with a logged error-map model after preparing them as training did.

    `predict` takes any input that aeplat.deploy.inputs accepts and returns a dict of arrays:
    `score` (M,) float64 mean squared reconstruction errors (higher is more abnormal),
    `error_map` (M, 1, S, S) float32 per-pixel squared errors, `input_index` (M,) and
    `slice_index` (M,) int64. With the parameter include_images=True it also returns `image`,
    the (M, 1, S, S) model input.
    """

    def load_context(self, context: PythonModelContext) -> None:
        import mlflow.pytorch

        self.config = ServingConfig.load(Path(context.artifacts[CONFIG_ARTIFACT]))
        self.error_map_model = mlflow.pytorch.load_model(context.artifacts[ERROR_MAP_ARTIFACT])
        logger.info("Loaded the aeplat scoring model for %s %s images of size %d.", self.config.dataset, self.config.modality, self.config.image_size)

    # MLflow 3.17 wraps `predict` to validate inputs against its type hints unless this
    # attribute is set. model_input has no type hint, because MLflow would derive an input
    # schema from it (or warn that it cannot), and that schema would reject some accepted
    # input kinds. aeplat.deploy.inputs checks the inputs instead.
    _skip_type_hint_validation = True

    def predict(self, context: PythonModelContext, model_input, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:  # noqa: ANN001
        try:
            prepared = prepare_images(model_input, self.config)
        except InvalidInputError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error

        scores, error_maps = score_prepared_images(self.error_map_model, prepared.images)
        output = {
            SCORE: scores,
            ERROR_MAP: error_maps,
            INPUT_INDEX: prepared.input_index,
            SLICE_INDEX: prepared.slice_index,
        }
        if (params or {}).get(INCLUDE_IMAGES_PARAM):
            output[IMAGE] = prepared.images
        return output


def score_prepared_images(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the float64 (M,) scores and float32 (M, 1, S, S) error maps of model-ready images.

    The scores are computed with aeplat.trainers.scoring.image_scores, as Trainer.score does.
    """
    scores, error_maps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.as_tensor(images[start : start + BATCH_SIZE], dtype=torch.float32)
            maps = model(batch)
            scores.append(image_scores(maps))
            error_maps.append(maps)

    return torch.cat(scores).numpy().astype(np.float64), torch.cat(error_maps).numpy()


def scoring_signature(image_size: int) -> ModelSignature:
    """Signature of the scoring model: no input schema, because inputs may be arrays, bytes or tables.

    The output schema documents the returned arrays, and the parameter schema the request
    parameter include_images.
    """
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.float64), (-1,), SCORE),
            TensorSpec(np.dtype(np.float32), (-1, 1, image_size, image_size), ERROR_MAP),
            TensorSpec(np.dtype(np.int64), (-1,), INPUT_INDEX),
            TensorSpec(np.dtype(np.int64), (-1,), SLICE_INDEX),
        ]
    )
    params = ParamSchema([ParamSpec(INCLUDE_IMAGES_PARAM, "boolean", False)])
    return ModelSignature(inputs=None, outputs=outputs, params=params)
