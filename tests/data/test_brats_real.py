"""Two real BraTS cases, one per naming scheme, loaded at 64x64 (about 0.3 s each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aeplat.data import ABNORMAL, NORMAL, BratsSettings, find_brats_cases, load_brats_case

# Slice counts of these cases with the default settings.
EXPECTED_COUNTS = {
    "Brats18_2013_11_1": {"normal": 67, "abnormal": 76},
    "BraTS2021_00006": {"normal": 68, "abnormal": 68},
}


@pytest.mark.parametrize("case_id", sorted(EXPECTED_COUNTS))
def test_real_case_loads(brats_dir: Path, case_id: str) -> None:
    (case,) = [case for case in find_brats_cases(brats_dir, "flair") if case.case_id == case_id]

    slices = load_brats_case(case, BratsSettings())
    mask_pixels = slices.masks.reshape(len(slices), -1).sum(axis=1)

    assert slices.class_counts() == EXPECTED_COUNTS[case_id]
    assert slices.images.shape[1:] == (1, 64, 64)
    assert slices.images.min() >= 0.0
    assert slices.images.max() <= 1.0
    assert not np.isnan(slices.images).any()
    assert (mask_pixels[slices.labels == NORMAL] == 0).all()
    # Lesions smaller than about half a 64x64 pixel vanish from the resized mask.
    assert (mask_pixels[slices.labels == ABNORMAL] > 0).mean() > 0.9
    assert (np.diff(slices.slice_indices) > 0).all()
    assert (slices.slice_indices < 155).all()

