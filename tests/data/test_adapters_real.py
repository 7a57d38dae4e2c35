"""Adapters on real images: RSNA patients wrapped into DICOM and PNG, VinDr-CXR labels, brain tumour and paediatric chest X-ray folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aeplat.data.adapters import BrainTumorAdapter, FolderAdapter, RsnaAdapter, RsnaSettings, VindrAdapter, VindrSettings
from aeplat.data.adapters.brain_tumor import BrainTumorSettings
from aeplat.data.adapters.folder import FolderSettings
from aeplat.data.prepare import prepare_dataset
from aeplat.data.splits import SplitSettings, check_splits, split_by_patient
from aeplat.data.types import ABNORMAL
from dataset_layouts import CHEST_XRAY_PATIENT_PATTERN, build_rsna, build_vindr, rsna_rows


def _real(shared_dir: Path, name: str) -> Path:
    folder = shared_dir / "data" / name
    if not folder.exists():
        pytest.skip(f"real data {folder} is absent")
    return folder


@pytest.fixture(scope="module")
def rsna_dicom(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _real(shared_dir, "rsna")
    return build_rsna(shared_dir, tmp_path_factory.mktemp("rsna") / "rsna")


def test_rsna_dicom_classes_match_label_file(rsna_dicom: Path, shared_dir: Path) -> None:
    expected = {row["rsna_patientId"]: row["rsna_class"] for row in rsna_rows(shared_dir)}

    slices = prepare_dataset(RsnaAdapter(), rsna_dicom, RsnaSettings(image_size=32), None).slices

    classes = [expected[patient] for patient in slices.patient_ids.tolist()]
    assert slices.class_counts() == {"normal": classes.count("Normal"), "abnormal": classes.count("Lung Opacity")}
    assert "No Lung Opacity / Not Normal" not in classes
    assert len(slices.patients()) == len(slices)
    assert slices.masks[slices.labels == ABNORMAL].reshape(-1, 32 * 32).any(axis=1).all()


def test_rsna_include_not_normal_keeps_all(rsna_dicom: Path, shared_dir: Path) -> None:
    slices = prepare_dataset(RsnaAdapter(), rsna_dicom, RsnaSettings(image_size=32, include_not_normal=True), None).slices

    assert len(slices) == len(rsna_rows(shared_dir))


def test_rsna_png_export_matches_dicom(rsna_dicom: Path, shared_dir: Path, tmp_path: Path) -> None:
    png_root = build_rsna(shared_dir, tmp_path / "rsna-png", image_format="png")
    settings = RsnaSettings(image_size=32, labels_csv=rsna_dicom / "stage_2_train_labels.csv", image_dir=png_root / "stage_2_train_images")

    from_png = prepare_dataset(RsnaAdapter(), tmp_path / "rsna-png", settings, None).slices
    from_dicom = prepare_dataset(RsnaAdapter(), rsna_dicom, RsnaSettings(image_size=32), None).slices

    assert from_png.patient_ids.tolist() == from_dicom.patient_ids.tolist()
    # DICOM decoding windows to the stored value range and PNG divides by 255, so the images
    # agree up to a linear intensity map.
    for png_image, dicom_image in zip(from_png.images, from_dicom.images):
        assert np.corrcoef(png_image.ravel(), dicom_image.ravel())[0, 1] > 0.999


def test_vindr_real_labels(shared_dir: Path, tmp_path: Path) -> None:
    _real(shared_dir, "vindr")
    data_dir = build_vindr(shared_dir, tmp_path / "vindr", per_class=20)

    slices = prepare_dataset(VindrAdapter(), data_dir, VindrSettings(image_size=32), None).slices

    assert slices.class_counts() == {"normal": 20, "abnormal": 20}
    assert slices.masks[slices.labels == ABNORMAL].any()
    assert not slices.masks[slices.labels != ABNORMAL].any()


def test_brain_tumor_real_folders(shared_dir: Path) -> None:
    data_dir = _real(shared_dir, "brain_tumor")

    slices = prepare_dataset(BrainTumorAdapter(), data_dir, BrainTumorSettings(image_size=32), None).slices

    assert slices.class_counts() == {"normal": 60, "abnormal": 60}
    assert len(slices.patients()) == 120


def test_chest_xray_folder_patient_pattern(shared_dir: Path, tmp_path: Path) -> None:
    data_dir = _real(shared_dir, "chest_xray")
    settings = FolderSettings(
        image_size=16, normal_classes=("NORMAL",), abnormal_classes=("PNEUMONIA",), patient_id_pattern=CHEST_XRAY_PATIENT_PATTERN
    )

    slices = prepare_dataset(FolderAdapter(), data_dir, settings, tmp_path / "cache").slices
    splits = split_by_patient(slices, SplitSettings())

    assert slices.class_counts() == {"normal": 1341 + 234, "abnormal": 485 + 390}
    assert len(slices.patients()) < len(slices)
    check_splits(splits)
