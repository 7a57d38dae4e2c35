"""read_image format dispatch, Pillow and NIfTI reading, corrupt files, and resize_image."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_dicom
from PIL import Image

from aeplat.data.dicom import BadFileError
from aeplat.data.images import detect_format, read_image, resize_image

SALT = b"test-salt-of-32-bytes-0123456789"
EXIF_ORIENTATION = 0x0112


def _first_file(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    if not files:
        pytest.skip(f"no file matching {pattern} in {folder}")
    return files[0]


def test_grey_png_8bit(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(path)
    decoded = read_image(path)
    assert decoded.pixels.dtype == np.float32
    np.testing.assert_allclose(decoded.pixels, [[0.0, 0.2, 1.0]], atol=1e-6)
    assert decoded.patient_key is None
    assert decoded.metadata["Format"] == "PNG"


def test_grey_png_16bit(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    decoded = read_image(path)
    np.testing.assert_allclose(decoded.pixels, [[0.0, 32768 / 65535, 1.0]], atol=1e-6)


def test_rgb_jpeg_to_luma(tmp_path: Path) -> None:
    path = tmp_path / "green.jpg"
    Image.new("RGB", (16, 16), (0, 255, 0)).save(path, quality=100)
    decoded = read_image(path)
    assert decoded.pixels.shape == (16, 16)
    assert decoded.pixels.mean() == pytest.approx(0.587, abs=0.02)


@pytest.mark.parametrize("suffix", ["tiff", "bmp"])
def test_tiff_and_bmp(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"grey.{suffix}"
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(path)
    assert read_image(path).pixels.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20), dtype=np.uint8)
    pixels[0, 0] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)

    decoded = read_image(path).pixels
    assert decoded.shape == (20, 10)
    assert decoded[0, -1] > 0.5
    assert decoded[0, 0] < 0.5


@pytest.mark.parametrize("suffix, image_format", [("png", "PNG"), ("jpg", "JPEG")])
def test_truncated_pillow_file(tmp_path: Path, suffix: str, image_format: str) -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format=image_format)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with pytest.raises(BadFileError) as caught:
        read_image(path)
    assert caught.value.path == path
    assert str(path) in str(caught.value)


def test_garbage_with_image_suffix(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(b"this is not a PNG" * 10)
    with pytest.raises(BadFileError, match="fake.png"):
        read_image(path)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(BadFileError, match="not supported"):
        read_image(path)


def test_dicom_by_suffix_and_magic(tmp_path: Path) -> None:
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    with_suffix = write_dicom(tmp_path / "image.dcm", pixels, bits_stored=12)
    without_suffix = write_dicom(tmp_path / "image_without_suffix", pixels, bits_stored=12)
    assert detect_format(with_suffix) == "dicom"
    assert detect_format(without_suffix) == "dicom"
    decoded = read_image(without_suffix, salt=SALT)
    assert decoded.pixels.tolist() == [[0.0, 1.0]]
    assert decoded.patient_key is not None


def test_nifti_2d(tmp_path: Path) -> None:
    values = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    decoded = read_image(path)
    assert decoded.pixels.shape == (10, 10)
    assert decoded.pixels.min() == 0.0
    assert decoded.pixels.max() == 1.0
    assert detect_format(path) == "nifti"


def test_nifti_single_slice_orientation(tmp_path: Path) -> None:
    values = np.zeros((4, 6, 1), dtype=np.float32)
    values[0, 5, 0] = 10.0  # left-most x, most anterior y
    values[1:, :, 0] = 1.0
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    pixels = read_image(path).pixels
    # Anterior at the top, as the BraTS slices.
    assert pixels.shape == (6, 4)
    assert pixels[0, 0] == 1.0


def test_nifti_negative_values(tmp_path: Path) -> None:
    values = np.linspace(-1000, 1000, 400, dtype=np.float32).reshape(20, 20)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    pixels = read_image(path).pixels
    # The background below 0 is kept, unlike the brain-only scaling of non-negative images.
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0
    assert np.median(pixels) == pytest.approx(0.5, abs=0.02)
    assert np.count_nonzero(pixels == 0.0) <= 4


def test_nifti_volume_rejected(tmp_path: Path) -> None:
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), dtype=np.float32), np.eye(4)), path)
    with pytest.raises(BadFileError, match="2-D image or a single slice"):
        read_image(path)


def test_truncated_nifti(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((64, 64)).astype(np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(BadFileError, match="cut.nii.gz"):
        read_image(path)


def test_real_png_and_jpeg(shared_dir: Path) -> None:
    png = _first_file(shared_dir / "data" / "rsna" / "nih_png_64px", "*/*/*.png")
    jpeg = _first_file(shared_dir / "data" / "chest_xray" / "test" / "NORMAL", "*.jpeg")
    for path in (png, jpeg):
        pixels = read_image(path).pixels
        assert pixels.ndim == 2, path.name
        assert pixels.min() >= 0.0, path.name
        assert pixels.max() <= 1.0, path.name
        assert pixels.std() > 0.05, path.name


def test_resize_keeps_aspect_ratio() -> None:
    pixels = np.ones((20, 40), dtype=np.float32)
    resized = resize_image(pixels, 16)
    assert resized.shape == (16, 16)
    assert resized.dtype == np.float32
    # The 20 x 40 image fills the middle half of the rows after padding to 40 x 40.
    assert resized[0].max() == 0.0
    assert resized[-1].max() == 0.0
    assert resized[8].min() == pytest.approx(1.0)


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        resize_image(np.ones((2, 4, 4), dtype=np.float32), 8)
    with pytest.raises(ValueError, match="at least 1"):
        resize_image(np.ones((4, 4), dtype=np.float32), 0)


def test_mode_i_32bit_tiff(tmp_path: Path) -> None:
    path = tmp_path / "wide.tiff"
    Image.fromarray(np.array([[-100000, 0, 100000]], dtype=np.int32)).save(path)
    decoded = read_image(path)
    np.testing.assert_allclose(decoded.pixels, [[0.0, 0.5, 1.0]], atol=1e-6)
