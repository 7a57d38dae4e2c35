"""Dataset adapters on small generated files: labels, patients, masks, bad files and the cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aeplat.data.adapters import (
    BrainTumorAdapter,
    DataOptions,
    FolderAdapter,
    RsnaAdapter,
    RsnaSettings,
    VindrAdapter,
    VindrSettings,
    get_adapter,
)
from aeplat.data.adapters.folder import FolderSettings
from aeplat.data.errors import DatasetError
from aeplat.data.prepare import prepare_dataset
from aeplat.data.types import ABNORMAL, NORMAL
from dataset_layouts import write_mono2_dicom


def _png(path: Path, value: int = 128, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size), value, dtype=np.uint8)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 255 - value
    Image.fromarray(pixels).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _folder_tree(root: Path) -> Path:
    for index in range(4):
        _png(root / "train" / "NORMAL" / f"IM-{index:04d}-0001.png", 100 + index)
        _png(root / "train" / "PNEUMONIA" / f"person{index}_virus_{index}.png", 60 + index)
    return root


FOLDER = FolderSettings(
    image_size=16,
    normal_classes=("NORMAL",),
    abnormal_classes=("PNEUMONIA",),
    patient_id_pattern=r"^(?P<patient>IM-\d+|person\d+)",
)


def test_folder_labels_and_patients(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")

    prepared = prepare_dataset(FolderAdapter(), data_dir, FOLDER, None)

    slices = prepared.slices
    assert slices.images.shape == (8, 1, 16, 16)
    assert slices.class_counts() == {"normal": 4, "abnormal": 4}
    assert "IM-0002" in slices.patients()
    assert "person3" in slices.patients()
    assert slices.masks is None
    assert set(slices.source_paths.tolist()) >= {"train/NORMAL/IM-0000-0001.png"}


def test_folder_pattern_mismatch_is_bad_file(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    _png(data_dir / "train" / "NORMAL" / "scan.png")

    with pytest.raises(DatasetError, match=r"train/NORMAL/scan.png: file name does not match"):
        prepare_dataset(FolderAdapter(), data_dir, FOLDER, None)

    skipped = prepare_dataset(FolderAdapter(), data_dir, FOLDER, None, on_bad_file="skip")
    assert [bad.name for bad in skipped.skipped] == ["train/NORMAL/scan.png"]
    assert len(skipped.slices) == 8


def test_truncated_image_skipped_with_reason(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    broken = data_dir / "train" / "PNEUMONIA" / "person9_virus_9.png"
    broken.write_bytes(_png(tmp_path / "whole.png").read_bytes()[:60])

    prepared = prepare_dataset(FolderAdapter(), data_dir, FOLDER, tmp_path / "cache", on_bad_file="skip")

    assert len(prepared.slices) == 8
    assert [bad.name for bad in prepared.skipped] == ["train/PNEUMONIA/person9_virus_9.png"]
    assert prepared.skipped[0].reason


def test_skipped_files_survive_cache(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    (data_dir / "train" / "NORMAL" / "IM-0099-0001.png").write_bytes(b"not an image")

    first = prepare_dataset(FolderAdapter(), data_dir, FOLDER, tmp_path / "cache", on_bad_file="skip")
    second = prepare_dataset(FolderAdapter(), data_dir, FOLDER, tmp_path / "cache", on_bad_file="skip")

    assert not first.cache_hit
    assert second.cache_hit
    assert second.skipped == first.skipped
    assert second.slices.source_paths.tolist() == first.slices.source_paths.tolist()


def test_bad_file_policy_changes_cache_key(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")

    failing = prepare_dataset(FolderAdapter(), data_dir, FOLDER, tmp_path / "cache")
    skipping = prepare_dataset(FolderAdapter(), data_dir, FOLDER, tmp_path / "cache", on_bad_file="skip")

    assert failing.cache_key != skipping.cache_key


def test_folder_masks_by_stem(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    masks = tmp_path / "masks"
    for index in range(4):
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[:20, :20] = 255
        masks.mkdir(exist_ok=True)
        Image.fromarray(mask).save(masks / f"person{index}_virus_{index}.png")
    settings = FolderSettings(**{**FOLDER.__dict__, "mask_dir": masks})

    slices = prepare_dataset(FolderAdapter(), data_dir, settings, None).slices

    abnormal = slices.masks[slices.labels == ABNORMAL]
    normal = slices.masks[slices.labels == NORMAL]
    assert abnormal[:, :, :8, :8].all()
    assert not abnormal[:, :, 8:, 8:].any()
    assert not normal.any()


def test_folder_mask_shape_mismatch_is_bad(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    masks = tmp_path / "masks"
    for index in range(4):
        _png(masks / f"person{index}_virus_{index}.png", size=30 if index == 0 else 40)
    settings = FolderSettings(**{**FOLDER.__dict__, "mask_dir": masks})

    with pytest.raises(DatasetError, match="has shape"):
        prepare_dataset(FolderAdapter(), data_dir, settings, None)


def test_folder_abnormal_without_mask_is_bad(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    masks = tmp_path / "masks"
    _png(masks / "person0_virus_0.png")
    settings = FolderSettings(**{**FOLDER.__dict__, "mask_dir": masks})

    prepared = prepare_dataset(FolderAdapter(), data_dir, settings, None, on_bad_file="skip")

    assert len(prepared.skipped) == 3
    assert all("without a mask" in bad.reason for bad in prepared.skipped)


def test_folder_patient_csv(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    files = sorted(path.relative_to(data_dir).as_posix() for path in data_dir.rglob("*.png"))
    patient_csv = _write_csv(tmp_path / "patients.csv", ["file", "patient"], [[name, "P1" if "NORMAL" in name else "P2"] for name in files])
    settings = FolderSettings(image_size=16, normal_classes=("NORMAL",), abnormal_classes=("PNEUMONIA",), patient_csv=patient_csv)

    slices = prepare_dataset(FolderAdapter(), data_dir, settings, None).slices

    assert slices.patients() == ["P1", "P2"]


def test_folder_without_class_folders_lists_found(tmp_path: Path) -> None:
    data_dir = _folder_tree(tmp_path / "xray")
    settings = FolderSettings(image_size=16, normal_classes=("healthy",), abnormal_classes=("sick",))

    with pytest.raises(DatasetError, match="the folders with images are NORMAL, PNEUMONIA, train"):
        prepare_dataset(FolderAdapter(), data_dir, settings, None)


def test_folder_without_normal_images_fails(tmp_path: Path) -> None:
    for index in range(3):
        _png(tmp_path / "xray" / "PNEUMONIA" / f"person{index}_x.png")
    _png(tmp_path / "xray" / "NORMAL" / "broken.png").write_bytes(b"x")

    with pytest.raises(DatasetError, match="has no normal image"):
        prepare_dataset(FolderAdapter(), tmp_path / "xray", FOLDER, None, on_bad_file="skip")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"normal_classes": ()}, "needs --normal-classes"),
        ({"abnormal_classes": ("NORMAL",)}, "in both"),
        ({"patient_id_pattern": r"(\d+)"}, "no named group"),
        ({"patient_id_pattern": r"(?P<patient>"}, "not a valid regular expression"),
        ({"name": "Chest X"}, "lower-case"),
        ({"image_size": 20}, "multiple of 16"),
        ({"image_size": 4096}, "above the largest supported size 512"),
    ],
)
def test_folder_settings_rejected(changes: dict, message: str) -> None:
    settings = FolderSettings(**{**FOLDER.__dict__, **changes})

    with pytest.raises(DatasetError, match=message):
        settings.validate()


def test_option_for_other_dataset_rejected() -> None:
    with pytest.raises(DatasetError, match="--labels-csv do not apply to --dataset brain-tumor"):
        get_adapter("brain-tumor").settings_from_options(DataOptions(labels_csv=Path("x.csv")))


def test_unknown_dataset_rejected() -> None:
    with pytest.raises(DatasetError, match="choose one of: brats, rsna, vindr, brain-tumor, folder"):
        get_adapter("mnist")


def test_brain_tumor_classes_and_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for split in ("Training", "Testing"):
        for class_name in ("notumor", "glioma", "pituitary"):
            _png(tmp_path / "bt" / split / class_name / f"{split[:2]}-{class_name}_1.jpg")

    with caplog.at_level("WARNING"):
        slices = prepare_dataset(BrainTumorAdapter(), tmp_path / "bt", BrainTumorAdapter().settings_from_options(DataOptions(image_size=16)), None).slices

    assert slices.class_counts() == {"normal": 2, "abnormal": 4}
    assert "Testing/notumor/Te-notumor_1" in slices.patients()
    assert "no patient ids" in caplog.text


def _rsna_layout(root: Path, with_classes: bool = True) -> Path:
    rows = [
        ["p-normal", "", "", "", "", 0],
        ["p-other", "", "", "", "", 0],
        ["p-opacity", 256, 256, 256, 512, 1],
        ["p-opacity", 600, 100, 100, 100, 1],
    ]
    root.mkdir(parents=True)
    _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    if with_classes:
        classes = [["p-normal", "Normal"], ["p-other", "No Lung Opacity / Not Normal"], ["p-opacity", "Lung Opacity"], ["p-opacity", "Lung Opacity"]]
        _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    for patient in ("p-normal", "p-other", "p-opacity"):
        write_mono2_dicom(root / "stage_2_train_images" / f"{patient}.dcm", np.full((64, 64), 90, dtype=np.uint8), patient)
    return root


def test_rsna_classes_and_boxes(tmp_path: Path) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna")

    slices = prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16), None).slices

    labels = dict(zip(slices.patient_ids.tolist(), slices.labels.tolist()))
    assert labels == {"p-normal": NORMAL, "p-opacity": ABNORMAL}
    mask = slices.masks[slices.patient_ids == "p-opacity"][0, 0]
    # Boxes are in 1024-pixel coordinates: x 256-512, y 256-768 covers columns 4-8 and rows 4-12 of 16.
    assert mask[4:12, 4:8].all()
    assert mask[:4].sum() + mask[12:].sum() <= 2 * 2


def test_rsna_include_not_normal(tmp_path: Path) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna")

    slices = prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16, include_not_normal=True), None).slices

    assert dict(zip(slices.patient_ids.tolist(), slices.labels.tolist()))["p-other"] == ABNORMAL


def test_rsna_without_classes_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna", with_classes=False)

    with caplog.at_level("WARNING"):
        slices = prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16), None).slices

    assert slices.class_counts() == {"normal": 2, "abnormal": 1}
    assert "not purely normal" in caplog.text
    with pytest.raises(DatasetError, match="--include-not-normal needs the class file"):
        prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16, include_not_normal=True), None)


def test_rsna_row_without_file_and_file_without_row(tmp_path: Path) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna")
    (data_dir / "stage_2_train_images" / "p-normal.dcm").unlink()
    write_mono2_dicom(data_dir / "stage_2_train_images" / "p-stray.dcm", np.zeros((8, 8), dtype=np.uint8), "p-stray")

    with pytest.raises(DatasetError) as raised:
        prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16), None)

    assert "p-normal: label row without an image file" in str(raised.value)
    assert "stage_2_train_images/p-stray.dcm: no row for patientId p-stray" in str(raised.value)


def test_rsna_unexpected_columns(tmp_path: Path) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna")
    _write_csv(data_dir / "stage_2_train_labels.csv", ["id", "label"], [["p-normal", 0]])

    with pytest.raises(DatasetError, match="expected \\(missing: patientId, x, y, width, height, Target\\)"):
        prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16), None)


def test_rsna_dicom_without_pixel_data_is_bad(tmp_path: Path) -> None:
    data_dir = _rsna_layout(tmp_path / "rsna")
    path = data_dir / "stage_2_train_images" / "p-opacity.dcm"
    path.write_bytes(path.read_bytes()[:-2000])

    prepared = prepare_dataset(RsnaAdapter(), data_dir, RsnaSettings(image_size=16), None, on_bad_file="skip")

    assert [bad.name for bad in prepared.skipped] == ["stage_2_train_images/p-opacity.dcm"]
    assert "pixel data" in prepared.skipped[0].reason


def _vindr_layout(root: Path) -> Path:
    header = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    rows = [
        ["clean", "No finding", 14, "R1", "", "", "", ""],
        ["clean", "No finding", 14, "R2", "", "", "", ""],
        ["clean", "No finding", 14, "R3", "", "", "", ""],
        ["split", "No finding", 14, "R1", "", "", "", ""],
        ["split", "No finding", 14, "R2", "", "", "", ""],
        ["split", "Nodule/Mass", 8, "R3", 10, 10, 20, 20],
        ["sick", "Cardiomegaly", 3, "R1", 0, 32, 64, 64],
        ["sick", "Cardiomegaly", 3, "R2", 0, 40, 64, 64],
        ["sick", "No finding", 14, "R3", "", "", "", ""],
    ]
    root.mkdir(parents=True)
    _write_csv(root / "train.csv", header, rows)
    for image_id in ("clean", "split", "sick"):
        write_mono2_dicom(root / "train" / f"{image_id}.dicom", np.full((64, 64), 80, dtype=np.uint8), image_id)
    return root


@pytest.mark.parametrize(("vote", "expected"), [("any", {"clean": 0, "split": 1, "sick": 1}), ("majority", {"clean": 0, "split": 0, "sick": 1})])
def test_vindr_radiologist_vote(tmp_path: Path, vote: str, expected: dict) -> None:
    data_dir = _vindr_layout(tmp_path / "vindr")

    slices = prepare_dataset(VindrAdapter(), data_dir, VindrSettings(image_size=16, finding_vote=vote), None).slices

    assert dict(zip(slices.patient_ids.tolist(), slices.labels.tolist())) == expected


def test_vindr_mask_is_union_of_boxes(tmp_path: Path) -> None:
    data_dir = _vindr_layout(tmp_path / "vindr")

    slices = prepare_dataset(VindrAdapter(), data_dir, VindrSettings(image_size=16), None).slices

    mask = slices.masks[slices.patient_ids == "sick"][0, 0]
    assert mask[8:, :].all()
    assert not mask[:8, :].any()


def test_vindr_box_outside_image_is_bad(tmp_path: Path) -> None:
    data_dir = _vindr_layout(tmp_path / "vindr")
    text = (data_dir / "train.csv").read_text().replace("Cardiomegaly,3,R1,0,32,64,64", "Cardiomegaly,3,R1,500,500,900,900")
    (data_dir / "train.csv").write_text(text)

    with pytest.raises(DatasetError, match="lies outside the 64x64 image"):
        prepare_dataset(VindrAdapter(), data_dir, VindrSettings(image_size=16), None)
