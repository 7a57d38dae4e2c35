"""Any tree of PNG, JPEG, DICOM or 2-D NIfTI images whose folder names give the class.

An image's class is the name of its nearest enclosing folder that appears in
normal_classes or abnormal_classes. Images under no such folder are ignored. The patient of
an image comes from the first of these that applies:

1. the patient CSV, with columns file and patient (file is the path relative to the data
   folder, or the file name);
2. the patient id pattern, a regular expression searched in the file name with a named
   group `patient`;
3. the DICOM PatientID, pseudonymised by aeplat.data.images;
4. the file's path without suffix, with a WARNING that images of one patient may then land
   in two splits.

Lesion masks are optional: with mask_dir, the mask of an image is the file in mask_dir with
the same name without suffix. An abnormal image without a mask is a bad file, and a normal
image without one gets an empty mask.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aeplat.data.adapters.base import (
    BadFileReport,
    DataOptions,
    DatasetAdapter,
    ProgressCallback,
    Scan,
    check_folder,
    check_image_size,
)
from aeplat.data.adapters.records import (
    ImageRecord,
    count_labels,
    file_stem,
    index_by_stem,
    list_image_files,
    load_records,
    read_label_csv,
)
from aeplat.data.errors import DatasetError
from aeplat.data.types import ABNORMAL, NORMAL, SliceSet

logger = logging.getLogger(__name__)

PATIENT_GROUP = "patient"
PATIENT_COLUMNS = ("file", "patient")
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class FolderSettings:
    """Options of the folder adapter.

    Attributes:
        image_size: side of the square output images in pixels, a multiple of 16.
        normal_classes: folder names whose images are normal.
        abnormal_classes: folder names whose images are abnormal.
        patient_id_pattern: regular expression with a group `patient`, searched in file names.
        patient_csv: CSV with columns file and patient.
        mask_dir: folder of lesion masks named like their images.
        name: lower-case dataset name for the registered model `folder-<name>`.
    """

    image_size: int = 64
    normal_classes: tuple[str, ...] = ()
    abnormal_classes: tuple[str, ...] = ()
    patient_id_pattern: str | None = None
    patient_csv: Path | None = None
    mask_dir: Path | None = None
    name: str | None = None

    def validate(self) -> None:
        check_image_size(self.image_size)
        if not self.normal_classes or not self.abnormal_classes:
            raise DatasetError(
                "--dataset folder needs --normal-classes and --abnormal-classes, the folder names of normal and "
                "abnormal images (for example --normal-classes NORMAL --abnormal-classes PNEUMONIA)."
            )
        both = sorted(set(self.normal_classes) & set(self.abnormal_classes))
        if both:
            raise DatasetError(f"Folder names {', '.join(both)} are in both --normal-classes and --abnormal-classes; keep each in one.")
        if self.patient_id_pattern is not None and self.patient_csv is not None:
            raise DatasetError("Pass either --patient-id-pattern or --patient-csv, not both.")
        if self.patient_id_pattern is not None:
            compile_patient_pattern(self.patient_id_pattern)
        if self.name is not None and not _NAME_PATTERN.match(self.name):
            raise DatasetError(
                f"--dataset-name {self.name!r} must be lower-case letters, digits and hyphens, for example chest-xray."
            )

    def as_dict(self) -> dict[str, Any]:
        # The patient CSV and masks are fingerprinted by content, so only their presence counts here.
        return {
            "image_size": self.image_size,
            "normal_classes": sorted(self.normal_classes),
            "abnormal_classes": sorted(self.abnormal_classes),
            "patient_id_pattern": self.patient_id_pattern,
            "patient_csv": self.patient_csv is not None,
            "mask_dir": self.mask_dir is not None,
        }


def compile_patient_pattern(pattern: str) -> re.Pattern[str]:
    """Compile --patient-id-pattern, raising DatasetError unless it is valid and has a group `patient`."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise DatasetError(f"--patient-id-pattern {pattern!r} is not a valid regular expression: {error}.") from error
    if PATIENT_GROUP not in compiled.groupindex:
        raise DatasetError(
            f"--patient-id-pattern {pattern!r} has no named group {PATIENT_GROUP!r}; write it as "
            r"for example '^(?P<patient>person\d+)_'."
        )
    return compiled


def _check_every_class_found(data_dir: Path, settings: FolderSettings, found: set[str]) -> None:
    """Raise DatasetError naming each --normal-classes or --abnormal-classes folder with no image."""
    missing = [name for name in (*settings.normal_classes, *settings.abnormal_classes) if name not in found]
    if not missing:
        return

    folders = sorted({path.name for path in data_dir.rglob("*") if path.is_dir()})
    raise DatasetError(
        f"No image found under a folder named {', '.join(missing)} in {data_dir}; folder names are case-sensitive. "
        f"Folders found: {', '.join(folders[:20]) or 'none'}. Fix --normal-classes or --abnormal-classes."
    )


class FolderAdapter(DatasetAdapter):
    """The folder dataset: class folders mapped to normal and abnormal by name."""

    name = "folder"

    def settings_from_options(self, options: DataOptions) -> FolderSettings:
        options.check_only(
            self.name,
            {"image_size", "normal_classes", "abnormal_classes", "patient_id_pattern", "patient_csv", "mask_dir", "name"},
        )
        settings = FolderSettings(
            image_size=options.image_size,
            normal_classes=tuple(options.normal_classes),
            abnormal_classes=tuple(options.abnormal_classes),
            patient_id_pattern=options.patient_id_pattern,
            patient_csv=options.patient_csv,
            mask_dir=options.mask_dir,
            name=options.name,
        )
        settings.validate()
        return settings

    def model_modality(self, settings: FolderSettings) -> str:
        return settings.name or "images"

    def scan(self, data_dir: Path, settings: FolderSettings) -> Scan:
        check_folder(data_dir, "Image data folder", "--data-dir")
        mask_dir = None if settings.mask_dir is None else check_folder(settings.mask_dir, "Mask folder", "--mask-dir")
        report = BadFileReport("skip", data_dir)

        classified, ignored = _classify(data_dir, settings, mask_dir)
        if not classified:
            raise DatasetError(_no_class_folders_message(data_dir, settings, ignored))
        _check_every_class_found(data_dir, settings, {class_name for _, class_name, _ in classified})
        if ignored:
            logger.info("Ignored %d image files outside the class folders.", len(ignored))

        patient_of = _patient_function(data_dir, settings, report)
        masks, duplicates = ({}, []) if mask_dir is None else index_by_stem(list_image_files(mask_dir), report.display_name)
        report.add_all(duplicates)

        records = []
        for path, class_name, label in classified:
            try:
                patient_id = patient_of(path)
            except ValueError as error:
                report.add(path, str(error))
                continue
            mask_path = masks.get(file_stem(path))
            if mask_dir is not None and mask_path is None and label == ABNORMAL:
                report.add(path, f"abnormal image without a mask named {file_stem(path)}.* in the mask folder")
                continue
            records.append(ImageRecord(path, label, class_name, patient_id, mask_path))

        logger.info("Folder scan: %s images to load, %d unusable entries.", count_labels(records), len(report.files))
        sources = [
            *(record.path for record in records),
            *(record.mask_path for record in records if record.mask_path is not None),
            *([settings.patient_csv] if settings.patient_csv else []),
        ]
        return Scan(data_dir, tuple(records), tuple(sources), tuple(report.files), has_masks=mask_dir is not None)

    def load(self, scan: Scan, settings: FolderSettings, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
        return load_records(scan, settings.image_size, report, progress)


def _classify(data_dir: Path, settings: FolderSettings, mask_dir: Path | None) -> tuple[list[tuple[Path, str, int]], list[Path]]:
    """Return (path, class, label) of images under a class folder, and the other image files."""
    classes = {name: NORMAL for name in settings.normal_classes} | {name: ABNORMAL for name in settings.abnormal_classes}
    resolved_masks = None if mask_dir is None else mask_dir.resolve()

    classified, ignored = [], []
    for path in list_image_files(data_dir):
        if resolved_masks is not None and resolved_masks in path.resolve().parents:
            continue
        folders = path.relative_to(data_dir).parts[:-1]
        class_name = next((folder for folder in reversed(folders) if folder in classes), None)
        if class_name is None:
            ignored.append(path)
        else:
            classified.append((path, class_name, classes[class_name]))
    return classified, ignored


def _no_class_folders_message(data_dir: Path, settings: FolderSettings, ignored: list[Path]) -> str:
    folders = sorted({part for path in ignored for part in path.relative_to(data_dir).parts[:-1]})
    return (
        f"No images found under folders named {', '.join((*settings.normal_classes, *settings.abnormal_classes))} "
        f"in {data_dir}. Expected PNG, JPEG, DICOM or NIfTI files in those folders; the folders with images are "
        f"{', '.join(folders[:20]) or 'none'}. Set --normal-classes and --abnormal-classes to their names."
    )


def _patient_function(data_dir: Path, settings: FolderSettings, report: BadFileReport) -> Callable[[Path], str | None]:
    """Return a function from image path to patient id (or None), raising ValueError for an image without one."""
    if settings.patient_csv is not None:
        return _csv_patients(data_dir, Path(settings.patient_csv))

    if settings.patient_id_pattern is not None:
        pattern = compile_patient_pattern(settings.patient_id_pattern)

        def from_pattern(path: Path) -> str:
            match = pattern.search(path.name)
            if match is None or not match.group(PATIENT_GROUP):
                raise ValueError(f"file name does not match --patient-id-pattern {settings.patient_id_pattern!r}")
            return match.group(PATIENT_GROUP)

        return from_pattern

    logger.warning(
        "No --patient-id-pattern or --patient-csv given, so images without a DICOM PatientID are split as "
        "their own patients. Images of one patient may land in two splits, which makes validation and test "
        "AUC optimistic."
    )
    return lambda path: None


def _csv_patients(data_dir: Path, patient_csv: Path) -> Callable[[Path], str]:
    table = read_label_csv(patient_csv, PATIENT_COLUMNS, "Patient CSV", "--patient-csv")
    by_file = {file.strip(): patient.strip() for file, patient in zip(table["file"], table["patient"]) if patient.strip()}

    def from_csv(path: Path) -> str:
        for key in (path.relative_to(data_dir).as_posix(), path.name):
            if key in by_file:
                return by_file[key]
        raise ValueError(f"no row in {patient_csv.name} for this file (by relative path or file name)")

    return from_csv
