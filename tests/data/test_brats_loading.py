"""Loading BraTS cases into slices: slice selection, labels, orientation and file errors."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aeplat.data import (
    ABNORMAL,
    NORMAL,
    BratsCase,
    BratsSettings,
    DatasetError,
    find_brats_cases,
    load_brats,
    load_brats_case,
)
from aeplat.data.nifti import read_canonical

CASE_ID = "BraTS2021_99999"
BRAIN_SLICES = list(range(4, 28))
TUMOUR_SLICES = list(range(9, 24))


def synthetic_case(data_dir: Path, modality: str = "flair") -> BratsCase:
    (case,) = find_brats_cases(data_dir, modality)
    return case


def write_nifti(path: Path, voxels: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(voxels, affine), path)
    return path


def test_synthetic_labels_follow_tumour(synthetic_cases_dir: Path) -> None:
    slices = load_brats_case(synthetic_case(synthetic_cases_dir), BratsSettings())

    assert slices.slice_indices.tolist() == BRAIN_SLICES
    abnormal = slices.slice_indices[slices.labels == ABNORMAL].tolist()
    assert abnormal == TUMOUR_SLICES
    assert slices.class_counts() == {"normal": 9, "abnormal": 15}


def test_synthetic_arrays_valid(synthetic_cases_dir: Path) -> None:
    slices = load_brats_case(synthetic_case(synthetic_cases_dir), BratsSettings(image_size=32))

    assert slices.images.shape == (24, 1, 32, 32)
    assert slices.images.dtype == np.float32
    assert not np.isnan(slices.images).any()
    assert slices.images.min() >= 0.0
    assert slices.images.max() <= 1.0
    assert slices.labels.dtype == np.int64
    assert slices.masks.shape == (24, 1, 32, 32)
    assert slices.masks.dtype == np.uint8
    assert set(np.unique(slices.masks).tolist()) <= {0, 1}
    assert slices.patient_ids.tolist() == [CASE_ID] * 24
    assert slices.slice_indices.dtype == np.int64


def test_synthetic_masks_only_on_tumour_slices(synthetic_cases_dir: Path) -> None:
    slices = load_brats_case(synthetic_case(synthetic_cases_dir), BratsSettings())
    mask_pixels = slices.masks.reshape(len(slices), -1).sum(axis=1)

    assert (mask_pixels[slices.labels == NORMAL] == 0).all()
    assert (mask_pixels[slices.labels == ABNORMAL] > 0).all()


def test_synthetic_segmentation_labels_read(synthetic_cases_dir: Path) -> None:
    segmentation, _ = read_canonical(synthetic_case(synthetic_cases_dir).segmentation)

    counts = {label: int(np.count_nonzero(segmentation == label)) for label in (1, 2, 4)}
    assert counts == {1: 81, 2: 1162, 4: 176}


def test_min_brain_fraction_drops_small_slices(synthetic_cases_dir: Path) -> None:
    slices = load_brats_case(synthetic_case(synthetic_cases_dir), BratsSettings(min_brain_fraction=0.5))

    assert slices.slice_indices.tolist() == list(range(11, 22))


@pytest.mark.parametrize("modality", ["flair", "t1", "t1ce", "t2"])
def test_every_modality_loads(synthetic_cases_dir: Path, modality: str) -> None:
    settings = BratsSettings(modality=modality, image_size=16)

    slices = load_brats_case(synthetic_case(synthetic_cases_dir, modality), settings)

    assert slices.slice_indices.tolist() == BRAIN_SLICES
    assert slices.images.shape == (24, 1, 16, 16)


def test_load_brats_reports_progress(synthetic_cases_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = []
    caplog.set_level(logging.INFO, logger="aeplat.data.brats")

    slices = load_brats(synthetic_cases_dir, BratsSettings(image_size=16), progress=lambda done, total: calls.append((done, total)))

    assert len(slices) == 24
    assert calls == [(1, 1)]
    assert "BraTS2021_99999 (1/1): 9 normal and 15 abnormal flair slices" in caplog.text


def test_reoriented_mask_matches_reference(mismatch_dir: Path, synthetic_cases_dir: Path) -> None:
    reference = load_brats_case(synthetic_case(synthetic_cases_dir, "t1ce"), BratsSettings(modality="t1ce"))
    case = BratsCase(
        case_id="mismatch",
        folder=mismatch_dir,
        images={"t1ce": mismatch_dir / "image_LPS.nii.gz"},
        segmentation=mismatch_dir / "seg_RAS.nii.gz",
    )

    slices = load_brats_case(case, BratsSettings(modality="t1ce"))

    assert np.array_equal(slices.images, reference.images)
    assert np.array_equal(slices.masks, reference.masks)
    assert np.array_equal(slices.labels, reference.labels)


def test_reoriented_tumour_lies_on_bright_voxels(mismatch_dir: Path) -> None:
    image, _ = read_canonical(mismatch_dir / "image_LPS.nii.gz")
    segmentation, _ = read_canonical(mismatch_dir / "seg_RAS.nii.gz")
    naive_image = np.asanyarray(nib.load(mismatch_dir / "image_LPS.nii.gz").dataobj)
    naive_segmentation = np.asanyarray(nib.load(mismatch_dir / "seg_RAS.nii.gz").dataobj)
    brain_mean = image[image > 0].mean()

    # Enhancing tumour (label 4) is bright on t1ce only where mask and image align.
    assert image[segmentation == 4].mean() > 1.3 * brain_mean
    assert naive_image[naive_segmentation == 4].mean() < 1.1 * brain_mean


def test_disagreeing_affine_rejected(tmp_path: Path, mismatch_dir: Path) -> None:
    original = nib.load(mismatch_dir / "seg_RAS.nii.gz")
    shifted = original.affine.copy()
    shifted[0, 3] += 2.0
    tampered = write_nifti(tmp_path / "seg_shifted.nii.gz", np.asanyarray(original.dataobj), shifted)
    image_path = mismatch_dir / "image_LPS.nii.gz"
    case = BratsCase("tampered", tmp_path, {"flair": image_path}, tampered)

    with pytest.raises(DatasetError, match="different affines") as error:
        load_brats_case(case, BratsSettings())

    message = str(error.value)
    assert str(image_path) in message
    assert str(tampered) in message
    assert "-45." in message


def test_affine_rounding_tolerated(tmp_path: Path, mismatch_dir: Path) -> None:
    original = nib.load(mismatch_dir / "seg_RAS.nii.gz")
    nudged = original.affine.copy()
    nudged[0, 3] += 1e-5
    segmentation = write_nifti(tmp_path / "seg_nudged.nii.gz", np.asanyarray(original.dataobj), nudged)
    case = BratsCase("nudged", tmp_path, {"flair": mismatch_dir / "image_LPS.nii.gz"}, segmentation)

    slices = load_brats_case(case, BratsSettings(image_size=16))

    assert len(slices) == 24


def test_mask_shape_mismatch_rejected(tmp_path: Path) -> None:
    image = write_nifti(tmp_path / "image.nii.gz", np.ones((8, 8, 4), np.int16), np.eye(4))
    segmentation = write_nifti(tmp_path / "seg.nii.gz", np.zeros((8, 8, 5), np.uint8), np.eye(4))
    case = BratsCase("shapes", tmp_path, {"flair": image}, segmentation)

    with pytest.raises(DatasetError, match=r"shape \(8, 8, 4\).*shape \(8, 8, 5\)"):
        load_brats_case(case, BratsSettings(image_size=16))


def test_anterior_and_left_placement(tmp_path: Path) -> None:
    # RAS voxels: axis 0 runs left to right, axis 1 posterior to anterior.
    voxels = np.full((20, 20, 3), 100, dtype=np.int16)
    voxels[:, 15:, :] = 1000
    voxels[:4, :10, :] = 500
    segmentation = np.zeros(voxels.shape, np.uint8)
    segmentation[:, 15:, 1] = 1
    case = BratsCase(
        "orientation",
        tmp_path,
        {"flair": write_nifti(tmp_path / "ras.nii.gz", voxels, np.eye(4))},
        write_nifti(tmp_path / "ras_seg.nii.gz", segmentation, np.eye(4)),
    )

    slices = load_brats_case(case, BratsSettings(image_size=16))
    image = slices.images[0, 0]

    assert image[:3].mean() > 0.9
    assert image[-3:, -3:].mean() < 0.1
    assert 0.2 < image[-3:, :2].mean() < 0.8
    assert slices.masks[1, 0, :3].all()
    assert not slices.masks[1, 0, 6:].any()


def test_orientation_independent_of_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    voxels = rng.integers(1, 1000, size=(16, 16, 4)).astype(np.int16)
    segmentation = (voxels > 900).astype(np.uint8)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = 15.0
    ras_case = BratsCase(
        "ras",
        tmp_path,
        {"flair": write_nifti(tmp_path / "ras.nii.gz", voxels, np.eye(4))},
        write_nifti(tmp_path / "ras_seg.nii.gz", segmentation, np.eye(4)),
    )
    lps_case = BratsCase(
        "lps",
        tmp_path,
        {"flair": write_nifti(tmp_path / "lps.nii.gz", voxels[::-1, ::-1].copy(), lps)},
        write_nifti(tmp_path / "lps_seg.nii.gz", segmentation[::-1, ::-1].copy(), lps),
    )

    ras = load_brats_case(ras_case, BratsSettings(image_size=16))
    lps_slices = load_brats_case(lps_case, BratsSettings(image_size=16))

    assert np.array_equal(ras.images, lps_slices.images)
    assert np.array_equal(ras.masks, lps_slices.masks)


def test_non_square_slices_padded(tmp_path: Path) -> None:
    voxels = np.full((32, 16, 2), 200, dtype=np.int16)
    case = BratsCase(
        "wide",
        tmp_path,
        {"flair": write_nifti(tmp_path / "wide.nii.gz", voxels, np.eye(4))},
        write_nifti(tmp_path / "wide_seg.nii.gz", np.zeros(voxels.shape, np.uint8), np.eye(4)),
    )

    slices = load_brats_case(case, BratsSettings(image_size=16, lower_percentile=0.0))

    assert slices.images.shape == (2, 1, 16, 16)
    assert slices.images[0, 0, 0].max() == 0.0
    assert slices.images[0, 0, 8].min() == 0.0


def test_truncated_file_named(synthetic_case_copy: Path) -> None:
    case = synthetic_case(synthetic_case_copy)
    content = case.images["flair"].read_bytes()
    case.images["flair"].write_bytes(content[: len(content) // 2])

    with pytest.raises(DatasetError, match="Failed to read NIfTI file") as error:
        load_brats(synthetic_case_copy, BratsSettings())
    assert str(case.images["flair"]) in str(error.value)


def test_empty_image_rejected(tmp_path: Path) -> None:
    image = write_nifti(tmp_path / "empty.nii.gz", np.zeros((8, 8, 4), np.int16), np.eye(4))
    segmentation = write_nifti(tmp_path / "seg.nii.gz", np.zeros((8, 8, 4), np.uint8), np.eye(4))
    case = BratsCase("empty", tmp_path, {"flair": image}, segmentation)

    with pytest.raises(DatasetError, match="no voxel > 0") as error:
        load_brats_case(case, BratsSettings(image_size=16))
    assert str(image) in str(error.value)


def test_missing_modality_of_case_rejected(synthetic_cases_dir: Path) -> None:
    case = synthetic_case(synthetic_cases_dir)
    without_t2 = BratsCase(case.case_id, case.folder, {"flair": case.images["flair"]}, case.segmentation)

    with pytest.raises(DatasetError, match="no t2 image, only flair"):
        load_brats_case(without_t2, BratsSettings(modality="t2"))


def test_high_brain_fraction_keeps_nothing(synthetic_case_copy: Path) -> None:
    with pytest.raises(DatasetError, match="Lower min_brain_fraction"):
        load_brats(synthetic_case_copy, BratsSettings(min_brain_fraction=0.9))


def test_four_d_single_volume_accepted(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "four_d.nii.gz", np.ones((8, 8, 4, 1), np.int16), np.eye(4))

    voxels, _ = read_canonical(path)

    assert voxels.shape == (8, 8, 4)


def test_time_series_rejected(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "series.nii.gz", np.ones((8, 8, 4, 2), np.int16), np.eye(4))

    with pytest.raises(DatasetError, match=r"shape \(8, 8, 4, 2\)"):
        read_canonical(path)


def test_copied_case_unchanged(synthetic_case_copy: Path, synthetic_cases_dir: Path) -> None:
    # Guards the fixture that other tests modify: a plain copy loads like the original.
    original = load_brats(synthetic_cases_dir, BratsSettings(image_size=16))
    copied = load_brats(synthetic_case_copy, BratsSettings(image_size=16))

    assert np.array_equal(original.images, copied.images)
