"""Turn the inputs of a served model into model-ready (1, S, S) images, as training prepared them.

Accepted inputs, each becoming one or more images:

- a numeric array (H, W), (N, H, W) or (N, 1, H, W) of intensity-normalised images in [0, 1],
  such as the slices that training scores;
- the bytes of a PNG, JPEG, DICOM, NIfTI (.nii or .nii.gz) or NumPy .npy file, or those bytes
  encoded as a base64 string, which is how the REST API carries them;
- a list of the above, a pandas DataFrame with an `image` column of them, or a dict with an
  `image` entry of them.

Files are decoded by the training code: 2-D files as the 2-D dataset adapters decode them, and
a 3-D NIfTI volume as a BraTS case, into one image per axial slice that contains brain.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import logging
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aeplat.data.brats import _brain_slice_indices
from aeplat.data.errors import DatasetError
from aeplat.data.nifti import read_canonical
from aeplat.data.preprocess import axial_stack, normalize_intensity, resize_images
from aeplat.deploy.config import ServingConfig

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"

# A pixel may exceed [0, 1] by this much, to allow for float rounding in the sender.
RANGE_TOLERANCE = 1e-6

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NUMPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_DICOM_PREAMBLE_LENGTH = 128
_NIFTI1_HEADER_SIZE = 348
_NIFTI2_HEADER_SIZE = 540


class InvalidInputError(ValueError):
    """An input cannot be turned into an image. The message names the input and the fix."""


@dataclass(frozen=True)
class PreparedImages:
    """Model-ready images and where each came from.

    Attributes:
        images: float32 (M, 1, S, S) in [0, 1].
        input_index: int64 (M,): the position of the input each image came from.
        slice_index: int64 (M,): the axial slice of a NIfTI volume in its RAS-reoriented
            array, or -1 for a 2-D image.
    """

    images: np.ndarray
    input_index: np.ndarray
    slice_index: np.ndarray


def prepare_images(model_input: Any, config: ServingConfig) -> PreparedImages:
    """Prepare every image of `model_input` for a model trained with `config`.

    Raises:
        InvalidInputError: the input container or one of its items cannot be read; the
            message names the item's position.
    """
    parts = []
    for index, item in enumerate(_input_items(model_input)):
        try:
            images, slices = _prepare_item(item, config)
        except (DatasetError, InvalidInputError) as error:
            raise InvalidInputError(f"Input {index}: {error}") from error
        parts.append((index, images, slices))

    if not parts:
        raise InvalidInputError("The input contains no image. Send at least one image.")
    return PreparedImages(
        images=np.concatenate([images for _, images, _ in parts]).astype(np.float32, copy=False),
        input_index=np.concatenate([np.full(len(images), index, dtype=np.int64) for index, images, _ in parts]),
        slice_index=np.concatenate([slices for _, _, slices in parts]).astype(np.int64, copy=False),
    )


def _input_items(model_input: Any) -> Iterator[Any]:
    """Yield the inputs of a request one by one. A numeric array is one input per image."""
    if isinstance(model_input, pd.DataFrame):
        yield from _column_items(model_input)
    elif isinstance(model_input, dict):
        yield from _dict_items(model_input)
    elif isinstance(model_input, np.ndarray) and _is_numeric(model_input):
        yield from _split_numeric_batch(model_input)
    elif isinstance(model_input, np.ndarray):
        yield from model_input.reshape(-1)
    elif isinstance(model_input, (list, tuple)):
        yield from model_input
    elif isinstance(model_input, (bytes, bytearray, memoryview, str)):
        yield model_input
    else:
        raise InvalidInputError(
            f"Unsupported input type {type(model_input).__name__}. Send a numeric array, file bytes, "
            f"a base64 string, a list of them, or a DataFrame with an {IMAGE_COLUMN!r} column."
        )


def _column_items(frame: pd.DataFrame) -> Iterator[Any]:
    if IMAGE_COLUMN not in frame.columns:
        raise InvalidInputError(
            f"The input DataFrame has columns {list(frame.columns)}, but an {IMAGE_COLUMN!r} column "
            "of file bytes or base64 strings is expected."
        )
    yield from frame[IMAGE_COLUMN].tolist()


def _dict_items(mapping: dict) -> Iterator[Any]:
    if IMAGE_COLUMN not in mapping:
        raise InvalidInputError(
            f"The input has keys {sorted(map(str, mapping))}, but an {IMAGE_COLUMN!r} key with a list "
            "of file bytes or base64 strings is expected."
        )
    value = mapping[IMAGE_COLUMN]
    yield from _input_items(value if not isinstance(value, (str, bytes, bytearray)) else [value])


def _prepare_item(item: Any, config: ServingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return the (K, 1, S, S) images of one input and their slice indices (-1 for 2-D images)."""
    if isinstance(item, np.ndarray) and _is_numeric(item):
        return _prepare_array(item, config), np.full(_image_count(item), -1)
    if isinstance(item, list):
        return _prepare_item(_numeric_array(item), config)
    if isinstance(item, str):
        item = _decode_base64(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _prepare_file_bytes(bytes(item), config)
    raise InvalidInputError(
        f"Unsupported item type {type(item).__name__}. Send file bytes, a base64 string or a numeric array."
    )


def _prepare_array(array: np.ndarray, config: ServingConfig) -> np.ndarray:
    """Check an array of normalised images and resize it to (K, 1, S, S) with the training resize."""
    stack = _as_image_stack(array)
    if not np.all(np.isfinite(stack)):
        raise InvalidInputError("The image array contains NaN or infinite values. Send finite intensities in [0, 1].")

    low, high = float(stack.min(initial=0.0)), float(stack.max(initial=0.0))
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise InvalidInputError(
            f"Image values lie in [{low:.4g}, {high:.4g}], but arrays must be intensity-normalised to [0, 1] "
            "as in training. Normalise them first, or send the image file so that it is decoded as in training."
        )
    return resize_images(stack, config.image_size)


def _as_image_stack(array: np.ndarray) -> np.ndarray:
    """Return a float32 (K, H, W) view of an (H, W), (K, H, W) or (K, 1, H, W) array."""
    if array.ndim == 2:
        stack = array[np.newaxis]
    elif array.ndim == 3:
        stack = array
    elif array.ndim == 4 and array.shape[1] == 1:
        stack = array[:, 0]
    else:
        raise InvalidInputError(
            f"An image array has shape {array.shape}, but (H, W), (N, H, W) or (N, 1, H, W) is expected."
        )

    if 0 in stack.shape[1:]:
        raise InvalidInputError(f"An image array has shape {array.shape}, with an empty image axis.")
    return stack.astype(np.float32, copy=False)


def _image_count(array: np.ndarray) -> int:
    return 1 if array.ndim == 2 else int(array.shape[0])


def _split_numeric_batch(array: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the images of a numeric (H, W), (N, H, W) or (N, 1, H, W) array one by one."""
    stack = _as_image_stack(array)
    yield from stack


def _is_numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "biuf"


def _numeric_array(values: list) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"A list item is not a rectangular array of numbers: {error}.") from error
    return array


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInputError(
            f"A string input is not valid base64 ({error}). Encode the file bytes with base64."
        ) from error


def _prepare_file_bytes(data: bytes, config: ServingConfig) -> tuple[np.ndarray, np.ndarray]:
    suffix = detect_suffix(data)
    if suffix == ".npy":
        return _prepare_item(_load_npy(data), config)

    with tempfile.TemporaryDirectory(prefix="aeplat-input-") as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        if suffix in (".nii", ".nii.gz") and _nifti_is_volume(path):
            return prepare_volume(path, config)
        return _prepare_2d_file(path, config), np.full(1, -1)


def detect_suffix(data: bytes) -> str:
    """Return the file suffix (.png, .jpg, .dcm, .nii, .nii.gz or .npy) that matches the bytes' signature.

    Raises:
        InvalidInputError: the bytes match none of the supported formats.
    """
    if data.startswith(_PNG_MAGIC):
        return ".png"
    if data.startswith(_JPEG_MAGIC):
        return ".jpg"
    if data.startswith(_NUMPY_MAGIC):
        return ".npy"
    if data[_DICOM_PREAMBLE_LENGTH : _DICOM_PREAMBLE_LENGTH + 4] == b"DICM":
        return ".dcm"
    if _is_nifti_header(data):
        return ".nii"
    if data.startswith(_GZIP_MAGIC) and _is_nifti_header(_gunzip_head(data)):
        return ".nii.gz"
    raise InvalidInputError(
        f"The {len(data)} bytes starting with {data[:8]!r} are not a PNG, JPEG, DICOM (with the 128-byte "
        "preamble and 'DICM'), NIfTI or NumPy .npy file. Send the file unchanged."
    )


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 4:
        return False
    sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
    if _NIFTI1_HEADER_SIZE in sizes:
        return head[344:347] in (b"n+1", b"ni1")
    if _NIFTI2_HEADER_SIZE in sizes:
        return head[4:7] in (b"n+2", b"ni2")
    return False


def _gunzip_head(data: bytes, size: int = _NIFTI2_HEADER_SIZE) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error):
        return b""


def _load_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"Failed to read the NumPy .npy input: {error}. Save it with numpy.save.") from error

    if not _is_numeric(array):
        raise InvalidInputError(f"The NumPy .npy input has dtype {array.dtype}, but a numeric array is expected.")
    return array


def _nifti_is_volume(path: Path) -> bool:
    """Return True when a NIfTI file has more than one slice along its third axis."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        shape = nib.load(path).shape
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as error:
        raise InvalidInputError(f"Failed to read the NIfTI input: {error}. Send the file unchanged.") from error
    return len(shape) >= 3 and shape[2] > 1


def prepare_volume(path: Path, config: ServingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return the (K, 1, S, S) brain slices of a NIfTI volume and their axial indices, as BraTS training does.

    The steps are those of aeplat.data.brats.load_brats_case: reorientation to RAS, the slice
    selection by brain fraction, per-volume percentile normalisation, rotation and resizing.

    Raises:
        DatasetError: the file is not a readable 3-D volume, or it contains no voxel > 0.
    """
    settings = config.brats_settings()
    volume, _ = read_canonical(path)
    indices = _brain_slice_indices(volume, path, settings.min_brain_fraction)
    if indices.size == 0:
        raise InvalidInputError(
            f"No axial slice of the volume has a brain fraction above {settings.min_brain_fraction}, so nothing is scored."
        )

    normalized = normalize_intensity(volume, settings.lower_percentile, settings.upper_percentile)
    return resize_images(axial_stack(normalized, indices), settings.image_size), indices.astype(np.int64)


def _prepare_2d_file(path: Path, config: ServingConfig) -> np.ndarray:
    """Decode a 2-D image file and resize it to (1, 1, S, S) as the 2-D dataset adapters do in training."""
    # Imported here because the 2-D adapters import the DICOM decoder, which a model trained
    # and served on arrays or volumes does not need.
    from aeplat.data.adapters.records import read_pixels

    pixels, _, _ = read_pixels(path)
    return resize_images(pixels[np.newaxis], config.image_size)
