"""Run a hyperparameter search: prepare data once, run trials with Ray Tune, track in MLflow.

Steps of `run_search`:
1. validate settings and the search space;
2. decode the dataset once (or read it from the cache), split it by patient and check the split;
3. open the MLflow parent run and log settings, space and split;
4. run the trials with Ray Tune (Optuna's TPE proposes, ASHA stops weak trials early);
5. score the best trial once on the test split and register its model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform as python_platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeplat.data import BratsSettings, DatasetSplits, SplitSettings, check_splits, prepare_brats, split_by_patient
from aeplat.data.cache import default_cache_dir
from aeplat.platform import env
from aeplat.platform.settings import SearchSettings
from aeplat.search_spaces import SearchSpace, load_search_space

logger = logging.getLogger(__name__)

OPTIMIZED_METRIC = "best_val_auc"
SCHEDULER_METRIC = "val_auc"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class SearchError(RuntimeError):
    """The search could not produce a model; the message says why and what to do."""


@dataclass
class SearchOutcome:
    """What a finished search produced."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    trials: list[dict[str, Any]]
    best_trial_id: str | None = None
    best_val_auc: float | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    registered_version: str | None = None
    is_champion: bool = False
    wall_time_s: float = 0.0


def resolve_tracking_uri(settings: SearchSettings) -> str:
    """Return --tracking-uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    uri = settings.tracking_uri or env.tracking_uri_from_env() or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make a relative SQLite path absolute so Ray workers and later commands find the same file.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def prepare_splits(settings: SearchSettings) -> tuple[DatasetSplits, str]:
    """Decode the dataset (or load it from the cache), split it by patient and check the split."""
    cache_dir = settings.cache_dir or default_cache_dir()
    brats_settings = BratsSettings(modality=settings.modality, image_size=settings.image_size)
    brats_settings.validate()

    prepared = prepare_brats(settings.data_dir, brats_settings, cache_dir)
    logger.info(
        "Dataset ready: %d slices from %d files (cache %s, key %s).",
        len(prepared.slices),
        prepared.source_files,
        "hit" if prepared.cache_hit else "miss",
        prepared.cache_key,
    )

    split_settings = SplitSettings(
        validation_fraction=settings.validation_fraction, test_fraction=settings.test_fraction, seed=settings.seed
    )
    split_settings.validate()
    splits = split_by_patient(prepared.slices, split_settings)
    check_splits(splits)

    if settings.max_train_images is not None and len(splits.train) > settings.max_train_images:
        chosen = np.random.default_rng(settings.seed).choice(len(splits.train), settings.max_train_images, replace=False)
        splits = DatasetSplits(train=splits.train.subset(np.sort(chosen)), validation=splits.validation, test=splits.test)

    return splits, prepared.cache_key


def run_search(settings: SearchSettings, console: Any = None) -> SearchOutcome:
    """Run a whole search and return what it produced. Raises SearchError when no trial succeeds."""
    started = time.monotonic()
    settings.validate()
    space = load_search_space(settings.dataset, settings.modality, settings.search_space)
    splits, cache_key = prepare_splits(settings)
    _log_split(splits)

    # Ray and MLflow read these at import time, so they are set before either is imported.
    env.apply_privacy_defaults()
    if not (settings.ray_address or env.ray_address_from_env()):
        env.bind_ray_to_loopback()

    from aeplat.platform import runner

    outcome = runner.run(settings, space, splits, cache_key, resolve_tracking_uri(settings), console)
    outcome.wall_time_s = time.monotonic() - started
    return outcome


def _log_split(splits: DatasetSplits) -> None:
    for name, part in splits.summary().items():
        logger.info(
            "Split %s: %d patients, %d normal and %d abnormal images.",
            name,
            len(part["patients"]),
            part["normal"],
            part["abnormal"],
        )


def library_versions() -> dict[str, str]:
    """Return versions of the libraries that decide a trial's numbers."""
    import mlflow
    import optuna
    import ray
    import sklearn
    import torch

    import aeplat

    return {
        "python": python_platform.python_version(),
        "aeplat": aeplat.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def split_summary_json(splits: DatasetSplits) -> str:
    return json.dumps(splits.summary(), indent=2)


def cpu_count() -> int:
    return os.cpu_count() or 1
