"""RSNA Pneumonia Detection Challenge chest X-rays: `<patientId>.dcm` files and the challenge's label tables.

Labels come from `stage_2_train_labels.csv` with columns patientId, x, y, width, height and
Target. It has one row per opacity box, and one row with an empty box for Target 0. When
present, `stage_2_detailed_class_info.csv` (patientId, class) adds the class. With the class table:

- "Normal" is normal;
- "Lung Opacity" is abnormal, and its boxes form the lesion mask;
- "No Lung Opacity / Not Normal" is left out, or counted as abnormal (with an empty mask)
  when include_not_normal is set.

Without the class table, Target 0 cannot tell "Normal" from "No Lung Opacity / Not Normal".
Target 0 then counts as normal and a WARNING says that the normal images include
not-normal ones, so the training set is not purely normal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aeplat.data.adapters.base import (
    BadFile,
    BadFileReport,
    DataOptions,
    DatasetAdapter,
    ProgressCallback,
    Scan,
    check_folder,
    check_image_size,
)
from aeplat.data.adapters.records import (
    Box,
    ImageRecord,
    count_labels,
    index_by_stem,
    list_image_files,
    load_records,
    parse_box,
    read_label_csv,
    resolve_image_dir,
)
from aeplat.data.errors import DatasetError
from aeplat.data.types import ABNORMAL, NORMAL, SliceSet

logger = logging.getLogger(__name__)

LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
IMAGES_FOLDER = "stage_2_train_images"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")

NORMAL_CLASS = "Normal"
OPACITY_CLASS = "Lung Opacity"
NOT_NORMAL_CLASS = "No Lung Opacity / Not Normal"

# The challenge's DICOM images are 1024x1024 and its boxes are in their pixels. Boxes are
# scaled to each decoded image, so they also fit exports of another size.
BOX_FRAME_SIZE = 1024


@dataclass(frozen=True)
class RsnaSettings:
    """Options of the rsna adapter.

    Attributes:
        image_size: side of the square output images in pixels, a multiple of 16.
        labels_csv: the label table; None means `<data dir>/stage_2_train_labels.csv`.
        image_dir: the image folder; None means `<data dir>/stage_2_train_images` when it
            exists, else the data folder. Files are matched to patients by file name
            without suffix, so PNG or JPEG exports named `<patientId>.png` work too.
        include_not_normal: count "No Lung Opacity / Not Normal" as abnormal instead of leaving it out.
    """

    image_size: int = 64
    labels_csv: Path | None = None
    image_dir: Path | None = None
    include_not_normal: bool = False

    def validate(self) -> None:
        check_image_size(self.image_size)

    def as_dict(self) -> dict[str, Any]:
        # The label tables and images are fingerprinted by content, so their paths are left out.
        return {"image_size": self.image_size, "include_not_normal": self.include_not_normal, "box_frame": BOX_FRAME_SIZE}


class RsnaAdapter(DatasetAdapter):
    """The rsna dataset: RSNA Pneumonia Detection Challenge DICOM files or PNG/JPEG exports."""

    name = "rsna"

    def settings_from_options(self, options: DataOptions) -> RsnaSettings:
        options.check_only(self.name, {"image_size", "labels_csv", "image_dir", "include_not_normal"})
        settings = RsnaSettings(
            image_size=options.image_size,
            labels_csv=options.labels_csv,
            image_dir=options.image_dir,
            include_not_normal=options.include_not_normal,
        )
        settings.validate()
        return settings

    def model_modality(self, settings: RsnaSettings) -> str:
        return "cxr"

    def scan(self, data_dir: Path, settings: RsnaSettings) -> Scan:
        check_folder(data_dir, "RSNA data folder", "--data-dir")
        image_dir = resolve_image_dir(data_dir, settings.image_dir, IMAGES_FOLDER, "RSNA image folder")
        labels_csv = Path(settings.labels_csv or data_dir / LABELS_FILE)
        class_csv = _find_class_csv(data_dir, labels_csv)

        labels = read_label_csv(labels_csv, LABEL_COLUMNS, "RSNA label file", "--labels-csv")
        classes = None if class_csv is None else read_label_csv(class_csv, CLASS_COLUMNS, "RSNA class file", "--labels-csv")
        if classes is None:
            _warn_without_classes(settings)

        report = BadFileReport("skip", data_dir)
        patients = _patients(labels, classes, settings, report)
        files, duplicates = index_by_stem(list_image_files(image_dir), report.display_name)
        report.add_all(duplicates)

        records = _records(patients, files, report)
        for stem in sorted(set(files) - set(patients) - _excluded(labels, classes, settings)):
            report.add(files[stem], f"no row for patientId {stem} in {labels_csv.name}")

        logger.info("RSNA scan: %s images to load, %d unusable entries.", count_labels(records), len(report.files))
        sources = [labels_csv, *([class_csv] if class_csv else []), *(record.path for record in records)]
        return Scan(data_dir, tuple(records), tuple(sources), tuple(report.files), has_masks=True)

    def load(self, scan: Scan, settings: RsnaSettings, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
        return load_records(scan, settings.image_size, report, progress)


@dataclass(frozen=True)
class _Patient:
    label: int
    class_name: str
    boxes: tuple[Box, ...]


def _find_class_csv(data_dir: Path, labels_csv: Path) -> Path | None:
    for candidate in (labels_csv.parent / CLASS_FILE, data_dir / CLASS_FILE):
        if candidate.is_file():
            return candidate
    return None


def _warn_without_classes(settings: RsnaSettings) -> None:
    if settings.include_not_normal:
        raise DatasetError(
            f"--include-not-normal needs the class file {CLASS_FILE}, because without it Target 0 cannot "
            "tell Normal from No Lung Opacity / Not Normal. Put the file next to the label file, or drop the option."
        )
    logger.warning(
        "No %s found next to the label file or in the data folder, so every Target 0 image counts as "
        "normal. Target 0 also covers 'No Lung Opacity / Not Normal' images, so the training set is not "
        "purely normal. Add the class file to leave those out.",
        CLASS_FILE,
    )


def _patients(
    labels: pd.DataFrame, classes: pd.DataFrame | None, settings: RsnaSettings, report: BadFileReport
) -> dict[str, _Patient]:
    """Return the usable patients with label, class and boxes; rows that contradict themselves are reported."""
    class_of = None if classes is None else _class_by_patient(classes, report)
    patients: dict[str, _Patient] = {}
    for patient_id, rows in labels.groupby("patientId", sort=True):
        targets = set(rows["Target"].str.strip())
        if not targets <= {"0", "1"} or len(targets) != 1:
            report.add(patient_id, f"label rows have Target values {sorted(targets)}, expected one of 0 or 1")
            continue
        target = int(targets.pop())

        if class_of is None:
            class_name = "Lung Opacity" if target else "Normal"
        else:
            class_name = class_of.get(patient_id)
        if class_name is None:
            report.add(patient_id, f"patientId has a label row but no row in {CLASS_FILE}")
            continue
        if (class_name == OPACITY_CLASS) != bool(target):
            report.add(patient_id, f"class {class_name!r} contradicts Target {target}")
            continue
        if class_name == NOT_NORMAL_CLASS and not settings.include_not_normal:
            continue

        try:
            boxes = _boxes(rows) if target else ()
        except ValueError as error:
            report.add(patient_id, f"invalid box in the label file: {error}")
            continue
        label = NORMAL if class_name == NORMAL_CLASS else ABNORMAL
        patients[patient_id] = _Patient(label, class_name, boxes)
    return patients


def _class_by_patient(classes: pd.DataFrame, report: BadFileReport) -> dict[str, str]:
    known = {NORMAL_CLASS, OPACITY_CLASS, NOT_NORMAL_CLASS}
    class_of: dict[str, str] = {}
    for patient_id, rows in classes.groupby("patientId", sort=True):
        names = set(rows["class"].str.strip())
        if len(names) != 1 or not names <= known:
            report.add(patient_id, f"class rows {sorted(names)} are not one of {sorted(known)}")
            continue
        class_of[patient_id] = names.pop()
    return class_of


def _boxes(rows: pd.DataFrame) -> tuple[Box, ...]:
    boxes = []
    for x, y, width, height in rows[["x", "y", "width", "height"]].itertuples(index=False):
        if not (x.strip() or y.strip() or width.strip() or height.strip()):
            continue
        box = parse_box([x, y, str(float(x) + float(width)), str(float(y) + float(height))])
        if box is not None:
            boxes.append(box)
    if not boxes:
        raise ValueError("Target 1 without any box")
    return tuple(boxes)


def _excluded(labels: pd.DataFrame, classes: pd.DataFrame | None, settings: RsnaSettings) -> set[str]:
    """Return the patients left out on purpose, whose image files are not bad."""
    if classes is None or settings.include_not_normal:
        return set()
    return set(classes.loc[classes["class"].str.strip() == NOT_NORMAL_CLASS, "patientId"])


def _records(patients: dict[str, _Patient], files: dict[str, Path], report: BadFileReport) -> list[ImageRecord]:
    records = []
    for patient_id, patient in patients.items():
        path = files.get(patient_id)
        if path is None:
            report.add(patient_id, "label row without an image file named after this patientId")
            continue
        records.append(
            ImageRecord(
                path=path,
                label=patient.label,
                class_name=patient.class_name,
                patient_id=patient_id,
                boxes=patient.boxes,
                box_frame=(BOX_FRAME_SIZE, BOX_FRAME_SIZE),
            )
        )
    return records
