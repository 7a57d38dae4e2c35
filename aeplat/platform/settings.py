"""Settings of one search, resolved from the command line and the environment."""

from __future__ import annotations

import hashlib
import json

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aeplat.data.adapters import BAD_FILE_POLICIES, DATASET_NAMES, DataOptions, get_adapter
from aeplat.data.brats import BRATS_MODALITIES

DATASETS = DATASET_NAMES


class SettingsError(ValueError):
    """A search setting is invalid; the message names the option and the fix."""


@dataclass(frozen=True)
class SearchSettings:
    """Everything `aeplat search` needs. Defaults match the command-line defaults."""

    dataset: str
    # A local folder, or an s3://bucket/prefix URI kept as str because Path would collapse its '//'.
    data_dir: Path | str
    modality: str = "flair"
    image_size: int = 64
    trials: int = 20
    max_concurrent: int = 2
    epochs: int = 30
    grace_period: int = 5
    reduction_factor: int = 3
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int = 0
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    max_train_images: int | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    # A str for an s3:// URI, because Path would collapse its double slash.
    storage: Path | str = field(default_factory=lambda: Path("aeplat-runs"))
    cache_dir: Path | None = None
    s3_endpoint_url: str | None = None
    search_space: Path | None = None
    max_failures: int = 0
    # Seconds between a trial's periodic checkpoints (aeplat.platform.trainable.CheckpointSchedule).
    checkpoint_interval: float = 30.0
    device: str = "auto"
    repeats: int = 1
    # None: continue the newest interrupted search with the same key if one exists (RUNNING or
    # KILLED in MLflow); True: also continue a FAILED one; False: always start a new search.
    resume: bool | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    on_bad_file: str = "fail"

    def dataset_options(self) -> DataOptions:
        """Return the adapter options with this search's image size and, for brats, its modality."""
        modality = self.modality if self.dataset == "brats" else None
        return replace(self.data_options, image_size=self.image_size, modality=modality)

    @property
    def model_modality(self) -> str:
        """Return the modality part of the model name: the BraTS sequence, cxr, mri, or the folder dataset's name."""
        adapter = get_adapter(self.dataset)
        return adapter.model_modality(adapter.settings_from_options(self.dataset_options()))

    @property
    def registered_model_name(self) -> str:
        return f"{self.dataset}-{self.model_modality}"

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"aeplat-{self.registered_model_name}"

    def validate(self) -> None:
        """Raise SettingsError for the first invalid option, naming it and the allowed values."""
        if self.dataset not in DATASETS:
            raise SettingsError(f"--dataset {self.dataset!r} is not supported; choose one of: {', '.join(DATASETS)}.")
        _require(
            self.on_bad_file in BAD_FILE_POLICIES,
            f"--on-bad-file must be one of {', '.join(BAD_FILE_POLICIES)}, got {self.on_bad_file!r}.",
        )
        if self.dataset == "brats" and self.modality not in BRATS_MODALITIES:
            raise SettingsError(f"--modality {self.modality!r} is not a BraTS modality; choose one of: {', '.join(BRATS_MODALITIES)}.")

        _require(self.trials >= 1, f"--trials must be at least 1, got {self.trials}.")
        _require(self.max_concurrent >= 1, f"--max-concurrent must be at least 1, got {self.max_concurrent}.")
        _require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}.")
        _require(
            1 <= self.grace_period <= self.epochs,
            f"--grace-period must lie in [1, --epochs={self.epochs}], got {self.grace_period}.",
        )
        _require(self.reduction_factor >= 2, f"--reduction-factor must be at least 2, got {self.reduction_factor}.")
        _require(self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}.")
        _require(self.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}.")
        _require(
            self.gpus_per_trial <= 1 or float(self.gpus_per_trial).is_integer(),
            f"--gpus-per-trial above 1 must be a whole number, got {self.gpus_per_trial}.",
        )
        _require(self.max_failures >= 0, f"--max-failures must be >= 0, got {self.max_failures}.")
        _require(
            self.checkpoint_interval >= 0,
            f"--checkpoint-interval must be >= 0 seconds (0 saves a checkpoint after every epoch), got {self.checkpoint_interval}.",
        )
        _require(
            self.max_train_images is None or self.max_train_images >= 2,
            f"--max-train-images must be at least 2, got {self.max_train_images}.",
        )
        _require(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}.")
        _require(self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}.")

    def search_key(self, space_description: dict[str, Any]) -> str:
        """Return a key of the settings that define a search's trials, to find the search again.

        Options that change only where or how fast trials run (concurrency, resources, Ray
        address, storage, tracking store, cache, checkpoint interval, --resume) are left out, so a search
        interrupted on one machine can resume on another.
        """
        volatile = {"max_concurrent", "cpus_per_trial", "gpus_per_trial", "ray_address", "tracking_uri", "storage", "cache_dir", "resume", "device", "max_failures", "s3_endpoint_url", "checkpoint_interval"}
        values = {key: value for key, value in self.as_params().items() if key not in volatile}
        text = json.dumps({"settings": values, "space": space_description}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def as_params(self) -> dict[str, Any]:
        """Return the settings as flat strings for MLflow params."""
        values = asdict(self)
        # The adapter options that the dataset receives, with this search's image size and modality.
        values.pop("data_options")
        values.update({f"data_{key}": value for key, value in asdict(self.dataset_options()).items()})
        return {key: "" if value is None else str(value) for key, value in values.items()}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)
