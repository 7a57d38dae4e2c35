"""VinDr-CXR chest X-rays: `<image_id>.dicom` files and the label table with one row per finding and radiologist.

The label table has the columns image_id, class_name, rad_id, x_min, y_min, x_max, y_max.
Every radiologist who read an image writes either one "No finding" row or one row per
finding, with a box in the pixel coordinates of the DICOM image. The lesion mask is the
union of all finding boxes.

Radiologists disagree on many images. finding_vote decides:

- "any" (default): an image is normal only when every radiologist wrote "No finding", and
  abnormal when any of them reported a finding. The training set then holds only images
  that no reader doubted, which is what an autoencoder trained on normal images needs.
- "majority": an image is abnormal when more than half of its radiologists reported a
  finding and normal when more than half wrote "No finding". Ties are left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

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

LABELS_FILE = "train.csv"
IMAGES_FOLDER = "train"
LABEL_COLUMNS = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "No finding"
FINDING_VOTES = ("any", "majority")


@dataclass(frozen=True)
class VindrSettings:
    """Options of the vindr adapter.

    Attributes:
        image_size: side of the square output images in pixels, a multiple of 16.
        labels_csv: the label table (plain or gzipped); None means `<data dir>/train.csv`.
        image_dir: the image folder; None means `<data dir>/train` when it exists, else the
            data folder. Files are matched by file name without suffix.
        finding_vote: "any" or "majority", see the module documentation.
    """

    image_size: int = 64
    labels_csv: Path | None = None
    image_dir: Path | None = None
    finding_vote: str = "any"

    def validate(self) -> None:
        check_image_size(self.image_size)
        if self.finding_vote not in FINDING_VOTES:
            raise DatasetError(f"--finding-vote must be one of {', '.join(FINDING_VOTES)}, got {self.finding_vote!r}.")

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "finding_vote": self.finding_vote}


class VindrAdapter(DatasetAdapter):
    """The vindr dataset: VinDr-CXR DICOM files and their radiologists' labels."""

    name = "vindr"

    def settings_from_options(self, options: DataOptions) -> VindrSettings:
        options.check_only(self.name, {"image_size", "labels_csv", "image_dir", "finding_vote"})
        settings = VindrSettings(
            image_size=options.image_size,
            labels_csv=options.labels_csv,
            image_dir=options.image_dir,
            finding_vote=options.finding_vote,
        )
        settings.validate()
        return settings

    def model_modality(self, settings: VindrSettings) -> str:
        return "cxr"

    def scan(self, data_dir: Path, settings: VindrSettings) -> Scan:
        check_folder(data_dir, "VinDr-CXR data folder", "--data-dir")
        image_dir = resolve_image_dir(data_dir, settings.image_dir, IMAGES_FOLDER, "VinDr-CXR image folder")
        labels_csv = Path(settings.labels_csv or data_dir / LABELS_FILE)
        labels = read_label_csv(labels_csv, LABEL_COLUMNS, "VinDr-CXR label file", "--labels-csv")

        report = BadFileReport("skip", data_dir)
        files, duplicates = index_by_stem(list_image_files(image_dir), report.display_name)
        report.add_all(duplicates)

        records, tied = [], []
        for image_id, rows in labels.groupby("image_id", sort=True):
            path = files.get(image_id)
            if path is None:
                report.add(image_id, "label row without an image file named after this image_id")
                continue
            try:
                label, boxes = _vote(rows, settings.finding_vote)
            except ValueError as error:
                report.add(path, f"invalid label row: {error}")
                continue
            if label is None:
                tied.append(image_id)
                continue
            class_name = "No finding" if label == NORMAL else "finding"
            records.append(ImageRecord(path=path, label=label, class_name=class_name, patient_id=image_id, boxes=boxes))

        for stem in sorted(set(files) - set(labels["image_id"])):
            report.add(files[stem], f"no row for image_id {stem} in {labels_csv.name}")
        if tied:
            logger.info("Left out %d images whose radiologists were split evenly (--finding-vote majority).", len(tied))

        logger.info("VinDr-CXR scan: %s images to load, %d unusable entries.", count_labels(records), len(report.files))
        sources = [labels_csv, *(record.path for record in records)]
        return Scan(data_dir, tuple(records), tuple(sources), tuple(report.files), has_masks=True)

    def load(self, scan: Scan, settings: VindrSettings, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
        return load_records(scan, settings.image_size, report, progress)


def _vote(rows: pd.DataFrame, finding_vote: str) -> tuple[int | None, tuple[Box, ...]]:
    """Return (label or None for a tie, finding boxes) of one image's label rows."""
    readers = set(rows["rad_id"])
    findings = rows[rows["class_name"].str.strip() != NO_FINDING]
    finding_readers = set(findings["rad_id"])
    boxes = tuple(
        box
        for box in (parse_box(values) for values in findings[["x_min", "y_min", "x_max", "y_max"]].itertuples(index=False))
        if box is not None
    )

    if finding_vote == "any":
        return (ABNORMAL if finding_readers else NORMAL), boxes

    if 2 * len(finding_readers) > len(readers):
        return ABNORMAL, boxes
    if 2 * len(finding_readers) < len(readers):
        return NORMAL, ()
    return None, ()
