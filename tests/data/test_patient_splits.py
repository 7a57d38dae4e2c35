"""Patient-level splits and the checks that keep every metric defined."""

from __future__ import annotations

import numpy as np
import pytest

from aeplat.data import (
    ABNORMAL,
    NORMAL,
    DatasetSplits,
    SliceSet,
    SplitError,
    SplitSettings,
    check_splits,
    minimum_patients,
    split_by_patient,
)


def make_slices(patients: dict[str, tuple[int, int]]) -> SliceSet:
    """Build 4x4 slices: patients maps an id to its (normal, abnormal) slice counts."""
    labels = []
    patient_ids = []
    for patient, (normal, abnormal) in patients.items():
        labels += [NORMAL] * normal + [ABNORMAL] * abnormal
        patient_ids += [patient] * (normal + abnormal)

    count = len(labels)
    return SliceSet(
        images=np.zeros((count, 1, 4, 4), np.float32),
        labels=np.array(labels, np.int64),
        masks=np.zeros((count, 1, 4, 4), np.uint8),
        patient_ids=np.array(patient_ids, np.str_),
        slice_indices=np.arange(count, dtype=np.int64),
    )


def ten_patients() -> SliceSet:
    return make_slices({f"case{index:02d}": (5, 3) for index in range(10)})


def split_patients(splits: DatasetSplits) -> tuple[list[str], list[str], list[str]]:
    return splits.train.patients(), splits.validation.patients(), splits.test.patients()


def test_split_disjoint_by_patient() -> None:
    train, validation, test = split_patients(split_by_patient(ten_patients(), SplitSettings()))

    assert not set(train) & set(validation)
    assert not set(train) & set(test)
    assert not set(validation) & set(test)
    assert sorted(train + validation + test) == ten_patients().patients()


def test_split_sizes_follow_fractions() -> None:
    train, validation, test = split_patients(split_by_patient(ten_patients(), SplitSettings(0.3, 0.2)))

    assert (len(train), len(validation), len(test)) == (5, 3, 2)


def test_train_holds_normal_images_only() -> None:
    splits = split_by_patient(ten_patients(), SplitSettings())

    assert (splits.train.labels == NORMAL).all()
    assert len(splits.train) == 5 * len(splits.train.patients())
    assert splits.validation.class_counts() == {"normal": 10, "abnormal": 6}
    assert splits.test.class_counts() == {"normal": 10, "abnormal": 6}


def test_split_deterministic_per_seed() -> None:
    first = split_patients(split_by_patient(ten_patients(), SplitSettings(seed=3)))
    second = split_patients(split_by_patient(ten_patients(), SplitSettings(seed=3)))
    other = split_patients(split_by_patient(ten_patients(), SplitSettings(seed=4)))

    assert first == second
    assert first != other


def test_split_independent_of_slice_order() -> None:
    slices = ten_patients()
    reversed_slices = slices.subset(np.arange(len(slices))[::-1])

    assert split_patients(split_by_patient(slices, SplitSettings())) == split_patients(
        split_by_patient(reversed_slices, SplitSettings())
    )


def test_small_fraction_holds_one_patient() -> None:
    slices = make_slices({f"case{index}": (2, 2) for index in range(5)})

    train, validation, test = split_patients(split_by_patient(slices, SplitSettings(0.05, 0.05)))

    assert (len(train), len(validation), len(test)) == (3, 1, 1)


def test_zero_fraction_holds_no_patient() -> None:
    splits = split_by_patient(ten_patients(), SplitSettings(0.2, 0.0))

    assert len(splits.test) == 0
    assert len(splits.validation.patients()) == 2


def test_too_few_patients_rejected() -> None:
    slices = make_slices({"a": (2, 2), "b": (2, 2)})

    with pytest.raises(SplitError, match="Too few patients") as error:
        split_by_patient(slices, SplitSettings())
    assert "of 2 patients" in str(error.value)
    assert "need at least 3 patients" in str(error.value)


def test_rounding_leaving_no_train_rejected() -> None:
    slices = make_slices({name: (2, 2) for name in "abcd"})

    with pytest.raises(SplitError, match="holds out 2 and --test-fraction 0.45 holds out 2") as error:
        split_by_patient(slices, SplitSettings(0.45, 0.45))
    assert "Lower the fractions" in str(error.value)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [(SplitSettings(), 3), (SplitSettings(0.0, 0.0), 1), (SplitSettings(0.45, 0.45), 3), (SplitSettings(0.2, 0.0), 2)],
)
def test_minimum_patients(settings: SplitSettings, expected: int) -> None:
    assert minimum_patients(settings) == expected


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (SplitSettings(validation_fraction=1.0), "--validation-fraction must lie in [0, 1), got 1.0"),
        (SplitSettings(test_fraction=-0.1), "--test-fraction must lie in [0, 1), got -0.1"),
        (SplitSettings(0.6, 0.4), "must be below 1"),
        (SplitSettings(seed=-1), "got -1"),
        (SplitSettings(seed=1.5), "got 1.5"),
    ],
)
def test_invalid_split_settings_rejected(settings: SplitSettings, expected: str) -> None:
    with pytest.raises(SplitError) as error:
        settings.validate()
    assert expected in str(error.value)


def test_valid_split_accepted() -> None:
    check_splits(split_by_patient(ten_patients(), SplitSettings()))


def test_one_class_validation_rejected() -> None:
    slices = make_slices({"a": (4, 0), "b": (4, 0), "c": (4, 2), "d": (3, 3), "e": (5, 1)})
    splits = DatasetSplits(
        train=slices.subset(np.isin(slices.patient_ids, ["c"]) & (slices.labels == NORMAL)),
        validation=slices.subset(np.isin(slices.patient_ids, ["a", "b"])),
        test=slices.subset(np.isin(slices.patient_ids, ["d", "e"])),
    )

    with pytest.raises(SplitError) as error:
        check_splits(splits)

    message = str(error.value)
    assert "validation has no abnormal image, so its AUC is undefined" in message
    assert "train: 1 patients, 4 normal and 0 abnormal images" in message
    assert "validation: 2 patients, 8 normal and 0 abnormal images" in message
    assert "test: 2 patients, 8 normal and 4 abnormal images" in message
    assert "--validation-fraction" in message
    assert "--seed" in message


def test_train_without_normal_rejected() -> None:
    slices = make_slices({"a": (0, 4), "b": (2, 2), "c": (2, 2)})
    splits = DatasetSplits(
        train=slices.subset(slices.patient_ids == "a"),
        validation=slices.subset(slices.patient_ids == "b"),
        test=slices.subset(slices.patient_ids == "c"),
    )

    with pytest.raises(SplitError, match="train has no normal image"):
        check_splits(splits)


def test_empty_test_split_rejected() -> None:
    splits = split_by_patient(ten_patients(), SplitSettings(0.2, 0.0))

    with pytest.raises(SplitError) as error:
        check_splits(splits)
    assert "test has no normal image" in str(error.value)
    assert "test has no abnormal image" in str(error.value)


def test_patient_leak_rejected() -> None:
    slices = ten_patients()
    splits = split_by_patient(slices, SplitSettings())
    leaked_patient = splits.test.patients()[0]
    leaked = DatasetSplits(
        train=splits.train,
        validation=SliceSet.concatenate([splits.validation, splits.test.subset(splits.test.patient_ids == leaked_patient)]),
        test=splits.test,
    )

    with pytest.raises(SplitError, match=f"Patients {leaked_patient} appear in both validation and test"):
        check_splits(leaked)
