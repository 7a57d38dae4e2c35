"""Log the best trial's model as a pyfunc scoring model, register it, and move the `champion` alias when it wins."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

import aeplat
from aeplat.data.brats import BratsSettings
from aeplat.deploy.config import CONFIG_FILE_NAME, ServingConfig
from aeplat.deploy.pyfunc import CONFIG_ARTIFACT, ERROR_MAP_ARTIFACT, MODEL_CODE_PATH, scoring_signature
from aeplat.platform.settings import SearchSettings

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "model"

# The URI that MLflow 3 returns for a logged model: models:/m-<32 hex digits>.
_LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")


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
    """Signature of the pt2 error-map model: images in, per-pixel squared errors out, both (N, C, H, W)."""
    shape = (-1, channels, image_size, image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
    )


# Distributions that the scoring model imports, pinned to the versions installed when it is logged.
SCORING_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "pandas",
    "scikit-learn",
    "nibabel",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pillow",
)


def _pip_requirements(distributions: tuple[str, ...]) -> list[str]:
    """Pin the installed versions, without local tags such as +cpu; distributions not installed are left out.

    Listing the requirements skips MLflow's requirement inference, which takes seconds per model.
    """
    requirements = []
    for name in distributions:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        requirements.append(f"{name}=={version.split('+', 1)[0]}")
    return requirements


def serving_config(settings: SearchSettings) -> ServingConfig:
    """Return the preprocessing settings of a search's models, for serving them."""
    # NOTE: these must stay the settings that aeplat.platform.search.prepare_splits builds.
    if settings.dataset == "brats":
        return ServingConfig.from_brats(settings.dataset, BratsSettings(modality=settings.modality, image_size=settings.image_size))

    # Two-dimensional datasets use only the image size; the volume settings keep their defaults.
    defaults = BratsSettings(image_size=settings.image_size)
    return ServingConfig(
        dataset=settings.dataset,
        modality=settings.model_modality,
        image_size=settings.image_size,
        lower_percentile=defaults.lower_percentile,
        upper_percentile=defaults.upper_percentile,
        min_brain_fraction=defaults.min_brain_fraction,
    )


def log_scoring_model(run_id: str, model: torch.nn.Module, example: np.ndarray, config: ServingConfig) -> str:
    """Log an error-map model as an MLflow pyfunc scoring model into run `run_id` and return its model URI.

    The pyfunc model contains the error-map model in MLflow's pt2 format, the serving config
    and a copy of the aeplat package, whose preprocessing code it runs (see
    aeplat.deploy.pyfunc). `example` must have a batch of at least 2 images, so the exported
    batch dimension stays dynamic.
    """
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"The input example must have shape (N>=2, C, H, W), got {example.shape}.")
    example = example.astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="aeplat-model-") as folder:
        artifacts = _save_artifacts(Path(folder), model, example, config)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(MODEL_CODE_PATH),
                artifacts=artifacts,
                code_paths=[str(Path(aeplat.__file__).parent)],
                signature=scoring_signature(config.image_size),
                input_example=example[:1],
                pip_requirements=_pip_requirements(SCORING_DISTRIBUTIONS),
            )
    return info.model_uri


def _save_artifacts(folder: Path, model: torch.nn.Module, example: np.ndarray, config: ServingConfig) -> dict[str, str]:
    """Save the pt2 error-map model and the serving config under folder and return them by artifact key."""
    error_map_path = folder / ERROR_MAP_ARTIFACT
    mlflow.pytorch.save_model(
        model,
        path=str(error_map_path),
        signature=model_signature(example.shape[-1], example.shape[1]),
        input_example=example,
        pip_requirements=_pip_requirements(("torch", "numpy")),
        serialization_format="pt2",
    )

    config_path = folder / CONFIG_FILE_NAME
    config.save(config_path)
    return {ERROR_MAP_ARTIFACT: str(error_map_path), CONFIG_ARTIFACT: str(config_path)}


def logged_model_id(model_uri: str) -> str | None:
    """Return the logged-model id of a `models:/m-<id>` URI, else None.

    A tracking server (MLflow 3.17 over REST) rejects such a version source unless the
    request names the logged model too; SQLite stores accept it either way.
    """
    match = _LOGGED_MODEL_URI.fullmatch(model_uri)
    return match.group(1) if match else None


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
    version behind. The alias moves only after the version exists.
    """
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Anomaly detection autoencoder registered by aeplat.")

    string_tags = {key: str(value) for key, value in tags.items()}
    version = client.create_model_version(
        model_name, source=model_uri, run_id=run_id, tags=string_tags, model_id=logged_model_id(model_uri)
    )
    return promote_if_better(client, model_name, str(version.version), val_auc)


def find_search_version(client: MlflowClient, model_name: str, search_run_id: str) -> str | None:
    """Return the version that a search already registered (tag search_run_id), or None.

    A search that was killed after it registered its model and then resumed finds its version
    here instead of registering a second one.
    """
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    matching = [version for version in versions if version.tags.get("search_run_id") == search_run_id]
    if not matching:
        return None
    return str(min(int(version.version) for version in matching))


def promote_if_better(client: MlflowClient, model_name: str, version: str, val_auc: float) -> Registration:
    """Give `version` the champion alias unless the current champion has an equal or higher validation AUC."""
    previous_version, previous_auc = current_champion(client, model_name)
    if previous_version == version:
        logger.info("%s v%s is already the %s.", model_name, version, CHAMPION_ALIAS)
        is_champion = True
    elif previous_auc is None or val_auc > previous_auc:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        logger.info("Registered %s v%s as %s (validation AUC %.4f).", model_name, version, CHAMPION_ALIAS, val_auc)
        is_champion = True
    else:
        logger.info(
            "Registered %s v%s; the champion v%s keeps the alias (validation AUC %.4f >= %.4f).",
            model_name,
            version,
            previous_version,
            previous_auc,
            val_auc,
        )
        is_champion = False

    return Registration(
        model_name=model_name,
        version=version,
        model_uri=f"models:/{model_name}/{version}",
        is_champion=is_champion,
        previous_champion_version=None if previous_version == version else previous_version,
        previous_champion_val_auc=None if previous_version == version else previous_auc,
    )
