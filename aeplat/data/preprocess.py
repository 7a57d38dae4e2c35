"""Intensity normalisation, axial slicing, orientation and resizing of reoriented volumes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def normalize_intensity(volume: np.ndarray, lower_percentile: float, upper_percentile: float) -> np.ndarray:
    """Scale the brain voxels of a volume robustly to [0, 1] and set the background to 0.

    Brain voxels are the finite voxels > 0. Their lower and upper percentiles are mapped to
    0 and 1 and values outside are clipped, so a few outlier voxels do not squash the range.
    A volume without brain voxels, or with a constant brain intensity, has no contrast to
    scale and returns all zeros. The result never contains NaN.
    """
    normalized = np.zeros(volume.shape, dtype=np.float32)
    brain = np.isfinite(volume) & (volume > 0)
    if not brain.any():
        return normalized

    values = volume[brain].astype(np.float64)
    low, high = np.percentile(values, [lower_percentile, upper_percentile])
    if not high > low:
        return normalized

    scaled = (np.clip(values, low, high) - low) / (high - low)
    normalized[brain] = scaled.astype(np.float32)
    return normalized


def axial_stack(volume: np.ndarray, slice_indices: np.ndarray) -> np.ndarray:
    """Return the selected axial slices of a RAS volume as (N, rows, columns), anterior at the top.

    Each (x, y) slice is rotated by 90 degrees counter-clockwise (np.rot90, k=1): row 0 is
    the most anterior row and column 0 the patient's left, as in the neurological convention.
    """
    stack = np.moveaxis(volume[:, :, slice_indices], 2, 0)
    return np.ascontiguousarray(np.rot90(stack, k=1, axes=(1, 2)))


def resize_images(stack: np.ndarray, image_size: int) -> np.ndarray:
    """Pad (N, H, W) images to a square with zeros and resize them to (N, 1, size, size) in [0, 1].

    Resizing is bilinear with antialiasing, which averages the pixels that a downsampled
    pixel covers in place of skipping them.
    """
    tensor = _square_tensor(stack.astype(np.float32, copy=False))
    if tensor.shape[0] == 0:
        return np.zeros((0, 1, image_size, image_size), dtype=np.float32)

    resized = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0).numpy()


def resize_masks(stack: np.ndarray, image_size: int) -> np.ndarray:
    """Resize (N, H, W) lesion masks to (N, 1, size, size) uint8 in {0, 1}.

    Voxels > 0 count as lesion. Each output pixel is the lesion fraction of the area it
    covers, thresholded at 0.5, so a lesion smaller than about half an output pixel
    disappears from the resized mask while the slice label, taken at full resolution, stays
    abnormal.
    """
    tensor = _square_tensor((stack > 0).astype(np.float32))
    if tensor.shape[0] == 0:
        return np.zeros((0, 1, image_size, image_size), dtype=np.uint8)

    fraction = F.interpolate(tensor, size=(image_size, image_size), mode="area")
    return (fraction >= 0.5).to(torch.uint8).numpy()


def _square_tensor(stack: np.ndarray) -> torch.Tensor:
    """Return (N, 1, S, S) with S = max(H, W), centring each image on a zero background."""
    count, height, width = stack.shape
    if height == width:
        return torch.from_numpy(np.ascontiguousarray(stack[:, np.newaxis]))

    side = max(height, width)
    top = (side - height) // 2
    left = (side - width) // 2

    square = np.zeros((count, 1, side, side), dtype=stack.dtype)
    square[:, 0, top : top + height, left : left + width] = stack
    return torch.from_numpy(square)
