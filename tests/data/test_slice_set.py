"""SliceSet.concatenate, which joins the slices of several cases."""

from __future__ import annotations

import numpy as np
import pytest

from aeplat.data import SliceSet


def make_part(patient: str, count: int, with_masks: bool = True) -> SliceSet:
    return SliceSet(
        images=np.full((count, 1, 4, 4), count, np.float32),
        labels=np.ones(count, np.int64),
        masks=np.ones((count, 1, 4, 4), np.uint8) if with_masks else None,
        patient_ids=np.array([patient] * count, np.str_),
        slice_indices=np.arange(count, dtype=np.int64),
    )


def test_concatenate_keeps_order() -> None:
    joined = SliceSet.concatenate([make_part("a", 2), make_part("long_patient_id", 0), make_part("bb", 3)])

    assert len(joined) == 5
    assert joined.patient_ids.tolist() == ["a", "a", "bb", "bb", "bb"]
    assert joined.slice_indices.tolist() == [0, 1, 0, 1, 2]
    assert joined.masks.shape == (5, 1, 4, 4)
    assert joined.images.dtype == np.float32


def test_concatenate_without_masks() -> None:
    joined = SliceSet.concatenate([make_part("a", 2, with_masks=False), make_part("b", 1, with_masks=False)])

    assert joined.masks is None


def test_concatenate_mixed_masks_rejected() -> None:
    with pytest.raises(ValueError, match="1 parts with masks and 1 without"):
        SliceSet.concatenate([make_part("a", 2), make_part("b", 1, with_masks=False)])


def test_concatenate_nothing_rejected() -> None:
    with pytest.raises(ValueError, match="at least one SliceSet"):
        SliceSet.concatenate([])
