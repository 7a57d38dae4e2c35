"""Arrays that every dataset adapter produces and every trial consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NORMAL = 0
ABNORMAL = 1


@dataclass(frozen=True)
class SliceSet:
    """Prepared 2-D images with labels, lesion masks and patient ids.

    Attributes:
        images: float32 array of shape (N, 1, H, W) with intensities in [0, 1].
        labels: int64 array of shape (N,): 0 for a normal image, 1 for an abnormal one.
        masks: uint8 array of shape (N, 1, H, W) with values {0, 1}, or None when the
            dataset has no lesion masks.
        patient_ids: str array of shape (N,). Every split is made over these ids.
        slice_indices: int64 array of shape (N,): the axial index of the slice in its
            reoriented volume, or -1 for images that are not slices of a volume.
        source_paths: str array of shape (N,) with each image's file path relative to the
            data folder, or None when unknown. Log counts, not these paths, because a path
            may contain a patient identifier.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    patient_ids: np.ndarray
    slice_indices: np.ndarray
    source_paths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> SliceSet:
        """Return the images selected by a boolean mask or an integer index array."""
        masks = None if self.masks is None else self.masks[index]
        source_paths = None if self.source_paths is None else self.source_paths[index]
        return SliceSet(
            images=self.images[index],
            labels=self.labels[index],
            masks=masks,
            patient_ids=self.patient_ids[index],
            slice_indices=self.slice_indices[index],
            source_paths=source_paths,
        )

    def class_counts(self) -> dict[str, int]:
        abnormal = int(np.count_nonzero(self.labels == ABNORMAL))
        return {"normal": len(self) - abnormal, "abnormal": abnormal}

    def patients(self) -> list[str]:
        return sorted(set(self.patient_ids.tolist()))

    @staticmethod
    def concatenate(parts: Sequence[SliceSet]) -> SliceSet:
        """Join slice sets in order. Either every part has masks or none has.

        The result has source paths only when every part has them.
        """
        if not parts:
            raise ValueError("SliceSet.concatenate needs at least one SliceSet, got none.")

        with_masks = [part.masks is not None for part in parts]
        if any(with_masks) and not all(with_masks):
            raise ValueError(
                f"SliceSet.concatenate got {sum(with_masks)} parts with masks and "
                f"{len(parts) - sum(with_masks)} without. Give masks to all parts or to none."
            )

        masks = np.concatenate([part.masks for part in parts]) if all(with_masks) else None
        with_paths = all(part.source_paths is not None for part in parts)
        source_paths = np.concatenate([part.source_paths for part in parts]) if with_paths else None
        return SliceSet(
            images=np.concatenate([part.images for part in parts]),
            labels=np.concatenate([part.labels for part in parts]),
            masks=masks,
            patient_ids=np.concatenate([part.patient_ids for part in parts]),
            slice_indices=np.concatenate([part.slice_indices for part in parts]),
            source_paths=source_paths,
        )


@dataclass(frozen=True)
class DatasetSplits:
    """Patient-disjoint splits: train contains normal images only, validation and test both classes."""

    train: SliceSet
    validation: SliceSet
    test: SliceSet

    def summary(self) -> dict[str, Any]:
        """Return case ids and per-class image counts of each split, ready to log as JSON."""
        return {
            name: {"patients": part.patients(), **part.class_counts()}
            for name, part in (("train", self.train), ("validation", self.validation), ("test", self.test))
        }
