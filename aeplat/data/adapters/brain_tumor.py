"""Brain Tumor MRI (Kaggle, Nickparvar): JPEG slices in one folder per class.

The classes are `glioma`, `meningioma`, `pituitary` and `notumor`; `notumor` is normal and
the others are abnormal. The class folders lie in the data folder itself or under its
`Training/` and `Testing/` folders, which are pooled and split again by patient.

The dataset has no patient ids, so each image is its own patient (its path without
suffix). Slices of one patient can then land in two splits, which makes validation and
test AUC optimistic. Every scan logs a WARNING about it.
"""

from __future__ import annotations

import logging
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
from aeplat.data.adapters.records import ImageRecord, count_labels, file_stem, list_image_files, load_records
from aeplat.data.errors import DatasetError
from aeplat.data.types import ABNORMAL, NORMAL, SliceSet

logger = logging.getLogger(__name__)

NORMAL_CLASSES = ("notumor",)
ABNORMAL_CLASSES = ("glioma", "meningioma", "pituitary")
SPLIT_FOLDERS = ("Training", "Testing")
SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class BrainTumorSettings:
    """Options of the brain-tumor adapter: only the output size.

    Attributes:
        image_size: side of the square output images in pixels, a multiple of 16.
    """

    image_size: int = 64

    def validate(self) -> None:
        check_image_size(self.image_size)

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


class BrainTumorAdapter(DatasetAdapter):
    """The brain-tumor dataset: class folders of MRI slices without patient ids."""

    name = "brain-tumor"

    def settings_from_options(self, options: DataOptions) -> BrainTumorSettings:
        options.check_only(self.name, {"image_size"})
        settings = BrainTumorSettings(image_size=options.image_size)
        settings.validate()
        return settings

    def model_modality(self, settings: BrainTumorSettings) -> str:
        return "mri"

    def scan(self, data_dir: Path, settings: BrainTumorSettings) -> Scan:
        check_folder(data_dir, "Brain tumour data folder", "--data-dir")
        roots = [data_dir / name for name in SPLIT_FOLDERS if (data_dir / name).is_dir()] or [data_dir]

        records = []
        for root in roots:
            for class_name in (*NORMAL_CLASSES, *ABNORMAL_CLASSES):
                folder = root / class_name
                if not folder.is_dir():
                    continue
                label = NORMAL if class_name in NORMAL_CLASSES else ABNORMAL
                for path in list_image_files(folder, SUFFIXES):
                    relative = path.relative_to(data_dir)
                    patient_id = (relative.parent / file_stem(path)).as_posix()
                    records.append(ImageRecord(path=path, label=label, class_name=class_name, patient_id=patient_id))

        if not records:
            raise DatasetError(
                f"No images found in {data_dir}. Expected JPEG or PNG files in the class folders "
                f"{', '.join((*NORMAL_CLASSES, *ABNORMAL_CLASSES))}, directly in the data folder or under "
                f"{' and '.join(SPLIT_FOLDERS)}."
            )

        logger.warning(
            "The brain-tumor dataset has no patient ids, so every image is split as its own patient. "
            "Slices of one patient may land in two splits, which makes validation and test AUC optimistic."
        )
        logger.info("Brain tumour scan: %s images in %d root folder(s).", count_labels(records), len(roots))
        return Scan(data_dir, tuple(records), tuple(record.path for record in records), (), has_masks=False)

    def load(
        self, scan: Scan, settings: BrainTumorSettings, report: BadFileReport, progress: ProgressCallback | None
    ) -> SliceSet:
        return load_records(scan, settings.image_size, report, progress)
