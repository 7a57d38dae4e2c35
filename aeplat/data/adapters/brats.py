"""BraTS brain MRI volumes on the adapter interface; the reading itself lives in aeplat.data.brats.

Layout problems (a case without the chosen modality or segmentation, a folder that mixes
cases) always fail. A case whose files cannot be read, or whose mask does not align with
its image, is a bad file: it stops the run, or with --on-bad-file skip it is left out.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from aeplat.data.adapters.base import BadFileReport, DataOptions, DatasetAdapter, ProgressCallback, Scan
from aeplat.data.brats import BratsCase, BratsSettings, find_brats_cases, load_brats_case
from aeplat.data.errors import DatasetError
from aeplat.data.types import SliceSet

logger = logging.getLogger(__name__)


class BratsAdapter(DatasetAdapter):
    """The brats dataset: one folder per case with NIfTI volumes and a tumour segmentation."""

    name = "brats"

    def settings_from_options(self, options: DataOptions) -> BratsSettings:
        options.check_only(self.name, {"image_size", "modality"})
        settings = BratsSettings(image_size=options.image_size)
        if options.modality is not None:
            settings = replace(settings, modality=options.modality)
        settings.validate()
        return settings

    def model_modality(self, settings: BratsSettings) -> str:
        return settings.modality

    def scan(self, data_dir: Path, settings: BratsSettings) -> Scan:
        cases = find_brats_cases(data_dir, settings.modality)
        sources = [path for case in cases for path in (case.images[settings.modality], case.segmentation)]
        return Scan(Path(data_dir), tuple(cases), tuple(sources), (), has_masks=True)

    def load(self, scan: Scan, settings: BratsSettings, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
        cases: tuple[BratsCase, ...] = scan.items
        parts = []
        for done, case in enumerate(cases, start=1):
            image_path = case.images[settings.modality]
            try:
                part = load_brats_case(case, settings)
            except DatasetError as error:
                report.add(image_path, str(error))
            else:
                counts = part.class_counts()
                logger.info(
                    "Loaded BraTS case %s (%d/%d): %d normal and %d abnormal %s slices.",
                    case.case_id, done, len(cases), counts["normal"], counts["abnormal"], settings.modality,
                )
                relative = report.display_name(image_path)
                parts.append(replace(part, source_paths=np.full(len(part), relative, dtype=np.str_)))
            if progress is not None:
                progress(done, len(cases))

        if not parts:
            return _empty(settings.image_size)
        return SliceSet.concatenate(parts)


def _empty(image_size: int) -> SliceSet:
    shape = (0, 1, image_size, image_size)
    return SliceSet(
        images=np.zeros(shape, dtype=np.float32),
        labels=np.zeros(0, dtype=np.int64),
        masks=np.zeros(shape, dtype=np.uint8),
        patient_ids=np.zeros(0, dtype=np.str_),
        slice_indices=np.zeros(0, dtype=np.int64),
        source_paths=np.zeros(0, dtype=np.str_),
    )
