"""Constants and helpers shared by the deploy tests and their fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import numpy as np

from aeplat.trainers import Trainer

CASE_ID = "BraTS2021_00006"
IMAGE_SIZE = 32
MODEL_NAME = "brats-flair"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"

# Largest accepted difference between a served score and Trainer.score.
TOLERANCE = 1e-6


@contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """Point MLflow's tracking and registry at uri, and restore both URIs and their variables afterwards."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def trainer_scores(trainer: Trainer, images: np.ndarray) -> np.ndarray:
    """Score images with Trainer.score, which needs at least 2 images: a single image is scored twice."""
    if len(images) == 1:
        return trainer.score(np.concatenate([images, images]))[:1]
    return trainer.score(images)
