"""Preprocessing settings stored with a served model, so serving prepares images as training did."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aeplat.data.brats import BratsSettings

CONFIG_FILE_NAME = "serving_config.json"
CONFIG_FORMAT_VERSION = 1


class ServingConfigError(ValueError):
    """A stored serving configuration is missing, unreadable or from another format version."""


@dataclass(frozen=True)
class ServingConfig:
    """Settings that turn an input image into the (1, S, S) model input used in training.

    Attributes:
        dataset: the dataset the model was trained on, for example "brats".
        modality: the MRI sequence or imaging modality of the training images.
        image_size: side S of the square model input in pixels.
        lower_percentile: percentile of a NIfTI volume's brain intensities mapped to 0.
        upper_percentile: percentile of a NIfTI volume's brain intensities mapped to 1.
        min_brain_fraction: a slice of a NIfTI volume is scored when the fraction of its
            voxels that are brain (> 0) is above this value, as in training.
    """

    dataset: str
    modality: str
    image_size: int
    lower_percentile: float
    upper_percentile: float
    min_brain_fraction: float

    @classmethod
    def from_brats(cls, dataset: str, settings: BratsSettings) -> ServingConfig:
        """Return the serving settings of a model trained on slices prepared with `settings`."""
        return cls(
            dataset=dataset,
            modality=settings.modality,
            image_size=settings.image_size,
            lower_percentile=settings.lower_percentile,
            upper_percentile=settings.upper_percentile,
            min_brain_fraction=settings.min_brain_fraction,
        )

    def brats_settings(self) -> BratsSettings:
        """Return the BraTS settings that prepare a NIfTI volume for this model."""
        return BratsSettings(
            modality=self.modality,
            image_size=self.image_size,
            lower_percentile=self.lower_percentile,
            upper_percentile=self.upper_percentile,
            min_brain_fraction=self.min_brain_fraction,
        )

    def save(self, path: Path) -> None:
        """Write the settings as JSON, with the format version."""
        document = {"format_version": CONFIG_FORMAT_VERSION, **asdict(self)}
        Path(path).write_text(json.dumps(document, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ServingConfig:
        """Read settings written by `save`.

        Raises:
            ServingConfigError: the file is missing, is not JSON, has another format
                version, or lacks a setting.
        """
        document = _read_json(Path(path))
        version = document.pop("format_version", None)
        if version != CONFIG_FORMAT_VERSION:
            raise ServingConfigError(
                f"Serving config {path} has format version {version!r}, but this aeplat reads version "
                f"{CONFIG_FORMAT_VERSION}. Load the model with the aeplat version that logged it, or log it again."
            )

        try:
            return cls(**document)
        except TypeError as error:
            raise ServingConfigError(f"Serving config {path} is invalid: {error}. Log the model again.") from error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ServingConfigError(f"Failed to read serving config {path}: {error}. Log the model again.") from error

    if not isinstance(document, dict):
        raise ServingConfigError(f"Serving config {path} must contain a JSON object, got {type(document).__name__}.")
    return document
