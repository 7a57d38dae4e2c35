"""Patient-level train, validation and test splits for unsupervised anomaly detection.

Train keeps only normal images because the autoencoder learns what normal looks like.
Validation and test keep both classes, so that AUC is defined on them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from aeplat.data.errors import SplitError
from aeplat.data.types import NORMAL, DatasetSplits, SliceSet

SPLIT_NAMES = ("train", "validation", "test")

# Search bound for the smallest patient count that a split setting can serve. With both
# fractions below 1 and summing to less than 1, a valid count is found far below it.
_MAX_PATIENTS_SEARCHED = 1_000_000


@dataclass(frozen=True)
class SplitSettings:
    """Fractions of patients held out for validation and test, and the shuffle seed.

    Attributes:
        validation_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1).
        seed: seed of the patient shuffle, a non-negative integer.
    """

    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        """Raise SplitError for an invalid setting, naming its value and the allowed range."""
        for name, value in (("validation", self.validation_fraction), ("test", self.test_fraction)):
            if not (_is_number(value) and 0 <= value < 1):
                raise SplitError(f"--{name}-fraction must lie in [0, 1), got {value!r}.")

        if self.validation_fraction + self.test_fraction >= 1:
            raise SplitError(
                f"--validation-fraction ({self.validation_fraction}) plus --test-fraction "
                f"({self.test_fraction}) must be below 1, so that patients remain for training."
            )

        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SplitError(f"The split seed (--seed) must be a non-negative integer, got {self.seed!r}.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_by_patient(slices: SliceSet, settings: SplitSettings) -> DatasetSplits:
    """Split the slices by patient into train (normal images only), validation and test.

    Patient ids are sorted, shuffled with np.random.default_rng(seed), and the first
    max(1, round(fraction * patients)) go to validation, the next ones to test (each only
    when its fraction is above 0), and the rest to train. The result is the same for the
    same slices and seed. Run check_splits afterwards to make sure every metric is defined.

    Raises:
        SplitError: the settings are invalid, or there are too few patients to leave at
            least one for training.
    """
    settings.validate()
    patients = np.array(slices.patients(), dtype=np.str_)
    validation_count = _held_out_count(settings.validation_fraction, patients.size)
    test_count = _held_out_count(settings.test_fraction, patients.size)
    if validation_count + test_count >= patients.size:
        raise SplitError(_too_few_patients_message(settings, patients.size, validation_count, test_count))

    shuffled = patients[np.random.default_rng(settings.seed).permutation(patients.size)]
    validation_patients = shuffled[:validation_count]
    test_patients = shuffled[validation_count : validation_count + test_count]
    train_patients = shuffled[validation_count + test_count :]

    train_rows = np.isin(slices.patient_ids, train_patients) & (slices.labels == NORMAL)
    return DatasetSplits(
        train=slices.subset(train_rows),
        validation=slices.subset(np.isin(slices.patient_ids, validation_patients)),
        test=slices.subset(np.isin(slices.patient_ids, test_patients)),
    )


def minimum_patients(settings: SplitSettings) -> int:
    """Return the smallest patient count that leaves at least one patient for training.

    Because held-out counts are rounded, a few larger counts may still fail: 0.45 and
    0.45 split 3 patients into 1, 1 and 1 but hold out all of 4.
    """
    for count in range(1, _MAX_PATIENTS_SEARCHED):
        held_out = _held_out_count(settings.validation_fraction, count) + _held_out_count(settings.test_fraction, count)
        if held_out < count:
            return count
    raise SplitError(f"No patient count up to {_MAX_PATIENTS_SEARCHED} can be split with {settings}.")


def check_splits(splits: DatasetSplits) -> None:
    """Raise SplitError unless every split can serve its metric and no patient is in two splits.

    Train needs at least one normal image. Validation and test each need normal and
    abnormal images, because AUC is undefined on one class.
    """
    _check_patient_leakage(splits)

    parts = dict(zip(SPLIT_NAMES, (splits.train, splits.validation, splits.test)))
    problems = []
    if parts["train"].class_counts()["normal"] == 0:
        problems.append("train has no normal image, so the autoencoder has nothing to learn from")
    for name in ("validation", "test"):
        for label, count in parts[name].class_counts().items():
            if count == 0:
                problems.append(f"{name} has no {label} image, so its AUC is undefined")
    if not problems:
        return

    raise SplitError(
        "The patient split leaves a metric undefined:\n"
        + "\n".join(f"  - {problem}" for problem in problems)
        + "\nImages per split:\n"
        + describe_splits(splits)
        + "\nRaise --validation-fraction or --test-fraction, try another --seed, or add cases "
        "with and without tumour."
    )


def describe_splits(splits: DatasetSplits) -> str:
    """Return one line per split with its patient count and normal and abnormal image counts."""
    lines = []
    for name, part in zip(SPLIT_NAMES, (splits.train, splits.validation, splits.test)):
        counts = part.class_counts()
        lines.append(
            f"  {name}: {len(part.patients())} patients, {counts['normal']} normal and "
            f"{counts['abnormal']} abnormal images"
        )
    return "\n".join(lines)


def _too_few_patients_message(settings: SplitSettings, patient_count: int, validation_count: int, test_count: int) -> str:
    message = (
        f"Too few patients to split: of {patient_count} patients, --validation-fraction "
        f"{settings.validation_fraction} holds out {validation_count} and --test-fraction "
        f"{settings.test_fraction} holds out {test_count}, which leaves none for training. "
    )
    minimum = minimum_patients(settings)
    if patient_count < minimum:
        return message + f"Add cases (these fractions need at least {minimum} patients) or lower the fractions."
    return message + "Lower the fractions."


def _held_out_count(fraction: float, patient_count: int) -> int:
    if fraction <= 0:
        return 0
    return max(1, round(fraction * patient_count))


def _check_patient_leakage(splits: DatasetSplits) -> None:
    patients = {name: set(part.patients()) for name, part in zip(SPLIT_NAMES, (splits.train, splits.validation, splits.test))}
    for index, first in enumerate(SPLIT_NAMES):
        for second in SPLIT_NAMES[index + 1 :]:
            shared = sorted(patients[first] & patients[second])
            if shared:
                raise SplitError(
                    f"Patients {', '.join(shared)} appear in both {first} and {second}, so "
                    f"{second} metrics would be biased. Split by patient with split_by_patient."
                )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
