"""Run a hyperparameter search: prepare data once, run trials with Ray Tune, track in MLflow.

Steps of `run_search`:
1. validate settings and the search space;
2. decode the dataset once (or read it from the cache), split it by patient and check the split;
3. open the MLflow parent run and log settings, space and split;
4. run the trials with Ray Tune (Optuna's TPE proposes, ASHA stops weak trials early);
5. score the best trial once on the test split and register its model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import platform as python_platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeplat.data import DatasetSplits, SplitSettings, check_splits, split_by_patient
from aeplat.data.adapters import get_adapter
from aeplat.data.adapters.base import ProgressCallback
from aeplat.data.cache import PreparedDataset, default_cache_dir
from aeplat.data.prepare import prepare_dataset
from aeplat.platform import env
from aeplat.platform.settings import SearchSettings, SettingsError
from aeplat.platform.storage import materialize_data_dir
from aeplat.search_spaces import Parameter, SearchSpace, SearchSpaceError, load_search_space

logger = logging.getLogger(__name__)

OPTIMIZED_METRIC = "best_val_auc"
SCHEDULER_METRIC = "val_auc"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class SearchError(RuntimeError):
    """The search produced no model. The message gives the reason and the fix."""


@dataclass
class SearchOutcome:
    """Result of a finished search: MLflow ids, trial table, best trial and registration."""

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
    return resolve_tracking_uri_option(settings.tracking_uri)


def resolve_tracking_uri_option(option: str | None) -> str:
    """Return the --tracking-uri option, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    uri = option or env.tracking_uri_from_env() or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Make a relative SQLite path absolute so Ray workers and later commands find the same file.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def prepare_data(settings: SearchSettings, progress: ProgressCallback | None = None) -> PreparedDataset:
    """Decode the dataset through its adapter, or load it from the cache.

    progress(done, total) is called after each decoded file or volume.
    """
    cache_dir = settings.cache_dir or default_cache_dir()
    adapter = get_adapter(settings.dataset)
    adapter_settings = adapter.settings_from_options(settings.dataset_options())

    # An s3:// data folder is downloaded into the cache first, and its ETags stand in for content hashes.
    data = materialize_data_dir(settings.data_dir, cache_dir, settings.s3_endpoint_url)
    prepared = prepare_dataset(
        adapter,
        data.local_dir,
        adapter_settings,
        cache_dir,
        on_bad_file=settings.on_bad_file,
        progress=progress,
        known_digests=data.source_digests(),
    )
    logger.info(
        "Dataset ready: %d images from %d files (cache %s, key %s).",
        len(prepared.slices),
        prepared.source_files,
        "hit" if prepared.cache_hit else "miss",
        prepared.cache_key,
    )
    return prepared


def prepare_splits(
    settings: SearchSettings, progress: ProgressCallback | None = None
) -> tuple[DatasetSplits, PreparedDataset]:
    """Prepare the dataset (see prepare_data), split it by patient and check the split."""
    prepared = prepare_data(settings, progress)

    split_settings = SplitSettings(
        validation_fraction=settings.validation_fraction, test_fraction=settings.test_fraction, seed=settings.seed
    )
    split_settings.validate()
    splits = split_by_patient(prepared.slices, split_settings)
    check_splits(splits)

    if settings.max_train_images is not None and len(splits.train) > settings.max_train_images:
        chosen = np.random.default_rng(settings.seed).choice(len(splits.train), settings.max_train_images, replace=False)
        splits = DatasetSplits(train=splits.train.subset(np.sort(chosen)), validation=splits.validation, test=splits.test)

    return splits, prepared


def run_search(settings: SearchSettings, console: Any = None) -> SearchOutcome:
    """Run a whole search and return what it produced. Raises SearchError when no trial succeeds."""
    started = time.monotonic()
    settings.validate()
    space = load_search_space(settings.dataset, settings.model_modality, settings.search_space)
    check_training_names(space)
    check_training_values(space)
    if space.dataset != settings.dataset:
        logger.warning(
            "The search space %s is written for dataset %r, and this search runs on %r. Check --search-space.",
            settings.search_space,
            space.dataset,
            settings.dataset,
        )

    # Ray and MLflow read these at import time, so they are set before either is imported.
    env.apply_privacy_defaults()
    if not (settings.ray_address or env.ray_address_from_env()):
        env.bind_ray_to_loopback()

    check_device(settings)
    tracking_uri = resolve_tracking_uri(settings)
    check_tracking_store(tracking_uri)
    check_storage_folder(settings.storage)

    splits, prepared = prepare_splits(settings)
    _log_split(splits)

    from aeplat.platform import runner

    outcome = runner.run(settings, space, splits, prepared.cache_key, tracking_uri, console, skipped_files=prepared.skipped)
    outcome.wall_time_s = time.monotonic() - started
    return outcome


def check_training_names(space: SearchSpace) -> None:
    """Reject a search space whose parameter or constant names no trial can train with."""
    from aeplat.trainers import TrainingConfig

    known = {field.name for field in dataclasses.fields(TrainingConfig)} - {"seed"}
    names = {parameter.name for parameter in space.parameters} | set(space.constants)
    unknown = sorted(names - known)
    if unknown:
        raise SearchSpaceError(
            f"{space.source}: unknown training settings {unknown}; valid names are {sorted(known)}. "
            "The seed comes from --seed."
        )


def check_training_values(space: SearchSpace) -> None:
    """Reject a search space whose constants, choices or range ends fail TrainingConfig's checks.

    Each parameter value is checked together with the constants, so a rule that links two
    sampled parameters is checked only in the trials.
    """
    from aeplat.trainers import TrainingConfig

    try:
        TrainingConfig.from_mapping(dict(space.constants))
    except ValueError as error:
        raise SearchSpaceError(f"{space.source}: a constant is invalid: {error}. Fix it in the search space file.") from None

    for parameter in space.parameters:
        for value in _values_to_check(parameter):
            try:
                TrainingConfig.from_mapping({**space.constants, parameter.name: value})
            except ValueError as error:
                raise SearchSpaceError(
                    f"{space.source}: parameter {parameter.name!r} can take the invalid value {value!r}: {error}. "
                    "Fix its range or choices in the search space file."
                ) from None


def _values_to_check(parameter: Parameter) -> list[Any]:
    """Return every choice of a categorical parameter, else the ends of its range (and 0 with include_zero)."""
    if parameter.type == "categorical":
        return list(parameter.choices)

    values: list[Any] = [parameter.low, parameter.high]
    if parameter.type in ("int", "power_of_two"):
        values = [int(value) for value in values]
    if parameter.include_zero:
        values.append(0.0)
    return values


def check_device(settings: SearchSettings) -> None:
    """Reject --device cuda before any data is read when the embedded Ray's trials would find no CUDA device here."""
    if settings.device != "cuda" or settings.ray_address or env.ray_address_from_env():
        return

    import torch

    if not torch.cuda.is_available():
        raise SettingsError(
            "--device cuda, but torch finds no CUDA device on this machine. "
            "Use --device auto or cpu, or pass --ray-address of a cluster with GPU nodes."
        )


def check_storage_folder(storage: Path | str) -> None:
    """Write a file into a local --storage folder, so an unusable folder fails before any data is read."""
    if str(storage).startswith("s3://"):
        return

    folder = Path(storage).resolve()
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    probe = folder / f".aeplat-write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SettingsError(
            f"--storage {folder} is not a writable folder ({error.strerror or error}). "
            "Pass a folder you can write to, or s3://BUCKET/PREFIX."
        ) from error
    finally:
        # Folders made only for the check go again, so a search that fails later leaves none behind.
        for path in missing:
            try:
                path.rmdir()
            except OSError:
                break


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Open the MLflow store before any data is decoded, so a wrong --tracking-uri fails at once."""
    if uri.startswith(("http://", "https://")):
        _check_tracking_server(uri, timeout_s)
        return

    from mlflow.tracking import MlflowClient

    try:
        # The first client of a new SQLite file creates its tables; two at once corrupt it.
        with _sqlite_folder_lock(uri):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # Each store type raises its own errors; all mean the same here.
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise SettingsError(
            f"The MLflow store {uri} cannot be opened ({type(error).__name__}: {first_line}). "
            "Pass --tracking-uri sqlite:///PATH/mlflow.db with a writable folder, or the http:// address of an MLflow server. "
            "A SQLite file that holds no runs yet can be deleted and is then created again."
        ) from error


@contextlib.contextmanager
def _sqlite_folder_lock(uri: str):  # noqa: ANN202 - a context manager
    """Hold an exclusive lock on the folder of a sqlite:/// store; do nothing for other stores or missing folders."""
    folder = _sqlite_folder(uri)
    if folder is None:
        yield
        return

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _sqlite_folder(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    folder = Path(path).parent
    return folder if folder.is_dir() else None


def _check_tracking_server(uri: str, timeout_s: float) -> None:
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as error:
        raise SettingsError(
            f"The MLflow server at {uri} cannot be reached ({type(error).__name__}). "
            "Start it, or check --tracking-uri and $MLFLOW_TRACKING_URI."
        ) from error


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
