"""Read one 2-D image of any supported format (DICOM, PNG, JPEG, TIFF, BMP, NIfTI) to [0, 1].

The format is detected from the first bytes of the file, and from the suffix only when the
content does not identify it (a DICOM file without its 128-byte preamble, for example).
"""

from __future__ import annotations

import gzip
import logging
import types
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from PIL import Image, ImageOps, UnidentifiedImageError

from aeplat.data.dicom import LUMA_WEIGHTS, BadFileError, DecodedImage, decode_dicom
from aeplat.data.preprocess import axial_stack, normalize_intensity, resize_images

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Percentiles mapped to 0 and 1 for NIfTI images, the same defaults as BraTS volumes.
NIFTI_LOWER_PERCENTILE = 0.5
NIFTI_UPPER_PERCENTILE = 99.5

_HEADER_BYTES = 352
_DICOM_MAGIC_OFFSET = 128
_NIFTI1_MAGIC_OFFSET = 344
_PILLOW_MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"II*\x00",  # little-endian TIFF
    b"MM\x00*",  # big-endian TIFF
    b"BM",  # BMP
)

# Pillow modes of one 16-bit unsigned greyscale channel.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: Path, *, salt: bytes | None = None) -> DecodedImage:
    """Read a DICOM, PNG, JPEG, TIFF, BMP or 2-D NIfTI file as a greyscale image in [0, 1].

    DICOM goes through decode_dicom (which uses `salt` for the patient key). Pillow images
    get their EXIF orientation applied, colour is converted to BT.601 luma, and integer
    values are divided by the maximum of their bit depth. NIfTI images are scaled robustly
    between percentiles. Only DICOM files give a patient key. Of multi-page files only the
    first page is read.

    Raises:
        BadFileError: the format is not supported, or the file is truncated or corrupt.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "dicom":
        return decode_dicom(path, salt=salt)
    if kind == "pillow":
        return _read_pillow(path)
    return _read_nifti(path)


def detect_format(path: Path) -> str:
    """Return "dicom", "pillow" or "nifti" from the file's first bytes, else from its suffix.

    Raises:
        BadFileError: the file cannot be read or its format is not supported.
    """
    try:
        with path.open("rb") as stream:
            header = stream.read(_HEADER_BYTES)
    except OSError as error:
        raise BadFileError(path, f"failed to read the file ({error.strerror}). Check that it exists and is readable.") from error

    if header[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if header.startswith(_PILLOW_MAGICS):
        return "pillow"
    if header[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4] in (b"n+1\x00", b"ni1\x00") or header[4:8] == b"n+2\x00":
        return "nifti"

    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(PILLOW_SUFFIXES):
        return "pillow"
    raise BadFileError(
        path,
        "the format is not supported. Supported are DICOM (.dcm, .dicom), PNG, JPEG, TIFF, BMP and "
        "NIfTI (.nii, .nii.gz); convert the file or remove it from the dataset folder.",
    )


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pad a (H, W) image in [0, 1] to a square with zeros, centred, and resize it to (size, size).

    Resizing is bilinear with antialiasing, as for BraTS slices (preprocess.resize_images),
    so the aspect ratio is kept. Returns float32 in [0, 1].
    """
    if pixels.ndim != 2:
        raise ValueError(f"resize_image needs a 2-D (H, W) image, got shape {pixels.shape}.")
    if size < 1:
        raise ValueError(f"resize_image needs a size of at least 1 pixel, got {size}.")
    return resize_images(pixels[np.newaxis], size)[0, 0]


def _read_pillow(path: Path) -> DecodedImage:
    try:
        with Image.open(path) as image:
            file_format = str(image.format)
            mode = image.mode
            image.load()
            oriented = ImageOps.exif_transpose(image)
            pixels = _pillow_to_grey(oriented)
    except Image.DecompressionBombError as error:
        raise BadFileError(
            path,
            f"the image is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels ({error}). "
            "Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted.",
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadFileError(
            path,
            f"failed to decode the image ({type(error).__name__}: {error}). The file is truncated or corrupt; "
            "copy it again.",
        ) from error

    metadata = types.MappingProxyType({"Format": file_format, "Mode": mode})
    return DecodedImage(pixels=pixels, source=path, patient_key=None, metadata=metadata)


def _pillow_to_grey(image: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image to float32 grey in [0, 1]."""
    mode = image.mode

    if mode in ("L", "LA"):
        values = np.asarray(image.getchannel("L"), dtype=np.float64) / 255.0
    elif mode == "1":
        values = np.asarray(image, dtype=np.float64)
    elif mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 65535.0
    elif mode == "I":
        values = _scale_32bit(np.asarray(image, dtype=np.float64))
    elif mode == "F":
        values = _min_max(np.asarray(image, dtype=np.float64))
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        values = rgb @ LUMA_WEIGHTS / 255.0

    return np.clip(values, 0.0, 1.0).astype(np.float32)


def _read_nifti(path: Path) -> DecodedImage:
    try:
        image = nib.load(path)
        voxels = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ImageFileError) as error:
        raise BadFileError(
            path,
            f"failed to read the NIfTI file ({type(error).__name__}: {error}). The file is missing, truncated "
            "or not NIfTI; copy it again.",
        ) from error

    plane = _single_plane(voxels, path)
    pixels = _scale_robustly(plane.astype(np.float64))
    metadata = types.MappingProxyType({"Format": "NIfTI", "Shape": str(tuple(voxels.shape))})
    return DecodedImage(pixels=pixels, source=path, patient_key=None, metadata=metadata)


def _single_plane(voxels: np.ndarray, path: Path) -> np.ndarray:
    """Return the one (x, y) plane of a 2-D or single-slice image, anterior at the top as for BraTS."""
    while voxels.ndim > 2 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 2:
        raise BadFileError(
            path,
            f"the NIfTI image has shape {tuple(voxels.shape)}, but a 2-D image or a single slice is expected. "
            "Load 3-D volumes with the BraTS loader, or save one slice per file.",
        )

    # NOTE: the plane keeps its voxel order, without reorientation from the affine.
    return axial_stack(voxels[:, :, np.newaxis], np.array([0]))[0]


def _scale_robustly(plane: np.ndarray) -> np.ndarray:
    """Scale percentiles to [0, 1]: over voxels > 0 for images without negatives, as for BraTS.

    Images with negative values (CT in Hounsfield units) have no zero background, so their
    percentiles are taken over all finite values.
    """
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return np.zeros(plane.shape, dtype=np.float32)
    if finite.min() >= 0:
        return normalize_intensity(plane, NIFTI_LOWER_PERCENTILE, NIFTI_UPPER_PERCENTILE)

    low, high = np.percentile(finite, [NIFTI_LOWER_PERCENTILE, NIFTI_UPPER_PERCENTILE])
    if not high > low:
        return np.zeros(plane.shape, dtype=np.float32)
    scaled = (np.clip(np.nan_to_num(plane, nan=low), low, high) - low) / (high - low)
    return scaled.astype(np.float32)


def _scale_32bit(values: np.ndarray) -> np.ndarray:
    """Scale mode I (32-bit signed) values, which Pillow also uses for some 16-bit PNG files.

    NOTE: the bit depth of the source is not kept in mode I. Values within [0, 65535] are
    taken as 16-bit and divided by 65535; any other range is scaled by its minimum and maximum.
    """
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return values / 65535.0
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not finite.max() > finite.min():
        return np.zeros(values.shape)
    return (np.nan_to_num(values, nan=finite.min()) - finite.min()) / (finite.max() - finite.min())
