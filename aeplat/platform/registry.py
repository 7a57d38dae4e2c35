"""Log the best trial's model, register it, and move the `champion` alias when it wins."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "model"


@dataclass(frozen=True)
class Registration:
    """Outcome of registering a search's best model."""

    model_name: str
    version: str
    model_uri: str
    is_champion: bool
    previous_champion_version: str | None
    previous_champion_val_auc: float | None


def model_signature(image_size: int, channels: int = 1) -> ModelSignature:
    """Signature of an error-map model: images in, per-pixel squared errors out, both (N, C, H, W)."""
    shape = (-1, channels, image_size, image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
    )


def _pip_requirements() -> list[str]:
    # Listing the requirements skips MLflow's requirement inference, which takes seconds per model.
    torch_version = torch.__version__.split("+", 1)[0]
    return [f"torch=={torch_version}", f"numpy=={np.__version__}"]


def log_error_map_model(run_id: str, model: torch.nn.Module, example: np.ndarray) -> str:
    """Log `model` into run `run_id` in MLflow's pt2 format and return its model URI.

    `example` must have a batch of at least 2 images, so the exported batch dimension stays dynamic.
    """
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"The input example must have shape (N>=2, C, H, W), got {example.shape}.")

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT_NAME,
            signature=model_signature(example.shape[-1], example.shape[1]),
            input_example=example.astype(np.float32),
            pip_requirements=_pip_requirements(),
            serialization_format="pt2",
        )
    return info.model_uri


def current_champion(client: MlflowClient, model_name: str) -> tuple[str | None, float | None]:
    """Return the version and validation AUC of the model's champion, or (None, None)."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None, None

    raw_auc = version.tags.get("val_auc")
    try:
        return str(version.version), float(raw_auc) if raw_auc is not None else None
    except ValueError:
        logger.warning("Champion %s v%s has an unreadable val_auc tag %r; it will be replaced.", model_name, version.version, raw_auc)
        return str(version.version), None


def register_model(
    client: MlflowClient,
    model_name: str,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, Any],
    val_auc: float,
) -> Registration:
    """Register a logged model and give it the champion alias if its validation AUC is higher.

    The version is created with all its tags in one call, so a failure never leaves an untagged
    version behind; the alias moves only after the version exists.
    """
    previous_version, previous_auc = current_champion(client, model_name)

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Anomaly detection autoencoder registered by aeplat.")

    string_tags = {key: str(value) for key, value in tags.items()}
    version = client.create_model_version(model_name, source=model_uri, run_id=run_id, tags=string_tags)

    is_champion = previous_auc is None or val_auc > previous_auc
    if is_champion:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
        logger.info("Registered %s v%s as %s (validation AUC %.4f).", model_name, version.version, CHAMPION_ALIAS, val_auc)
    else:
        logger.info(
            "Registered %s v%s; the champion v%s keeps the alias (validation AUC %.4f >= %.4f).",
            model_name,
            version.version,
            previous_version,
            previous_auc,
            val_auc,
        )

    return Registration(
        model_name=model_name,
        version=str(version.version),
        model_uri=f"models:/{model_name}/{version.version}",
        is_champion=is_champion,
        previous_champion_version=previous_version,
        previous_champion_val_auc=previous_auc,
    )
