"""Read NIfTI volumes in canonical RAS orientation and check that an image and its mask align."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from aeplat.data.errors import DatasetError

# Affines of an image and its mask may differ by float32 rounding of the stored header.
# Anything larger than this (in mm, or in direction cosines) means they were not written
# for the same voxel grid.
AFFINE_TOLERANCE = 1e-3


def read_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D NIfTI file reoriented to canonical RAS and return (voxels, affine).

    After reorientation, array axis 0 runs from the patient's left to right, axis 1 from
    posterior to anterior and axis 2 from inferior to superior. Trailing axes of length 1
    (a 4-D file with one volume) are dropped.

    Raises:
        DatasetError: the file cannot be read or decompressed, or is not a 3-D volume.
    """
    try:
        image = nib.as_closest_canonical(nib.load(path))
        voxels = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as error:
        raise DatasetError(
            f"Failed to read NIfTI file {path}: {error}. The file is missing, truncated or not "
            "NIfTI; download or copy it again."
        ) from error

    while voxels.ndim > 3 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 3:
        raise DatasetError(
            f"NIfTI file {path} has shape {voxels.shape}, but a 3-D volume is expected. "
            "Pass one volume per file."
        )
    return voxels, np.asarray(image.affine, dtype=np.float64)


def check_alignment(
    image_path: Path,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
    mask_path: Path,
    mask_shape: tuple[int, ...],
    mask_affine: np.ndarray,
) -> None:
    """Raise DatasetError unless a reoriented image and its mask share one voxel grid."""
    if tuple(image_shape) != tuple(mask_shape):
        raise DatasetError(
            f"Image {image_path} has shape {tuple(image_shape)} but its mask {mask_path} has shape "
            f"{tuple(mask_shape)} after reorientation to RAS. Both must cover the same voxel grid; "
            "resample the mask onto the image or replace it."
        )

    if not np.allclose(image_affine, mask_affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise DatasetError(
            f"Image {image_path} and its mask {mask_path} have different affines after "
            f"reorientation to RAS (tolerance {AFFINE_TOLERANCE}), so the mask would not lie on "
            f"the image.\nImage affine:\n{_format_affine(image_affine)}\n"
            f"Mask affine:\n{_format_affine(mask_affine)}\n"
            "Resample the mask onto the image grid or fix the header of the wrong file."
        )


def _format_affine(affine: np.ndarray) -> str:
    return np.array2string(affine, precision=4, suppress_small=True)
