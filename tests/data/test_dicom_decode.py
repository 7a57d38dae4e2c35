"""DICOM decoding: stored values, modality LUT, VOI, MONOCHROME1, codecs and per-file errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, MPEG2MPML, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from aeplat.data.dicom import (
    BadFileError,
    apply_modality_lut,
    apply_voi,
    decode_dicom,
    missing_decoder_reason,
    read_dataset,
    read_stored_pixels,
    stored_pixels,
)

SALT = b"test-salt-of-32-bytes-0123456789"


@pytest.fixture
def cases_dir(shared_dir: Path) -> Path:
    folder = shared_dir / "cases" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"DICOM test cases {folder} are absent")
    return folder


@pytest.fixture
def cxr_dir(shared_dir: Path) -> Path:
    folder = shared_dir / "data" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"real chest X-ray DICOM files {folder} are absent")
    return folder


@pytest.fixture
def reference(cases_dir: Path) -> np.ndarray:
    return np.load(cases_dir / "ref_uncompressed_12bit_mono2.expected.npy")


def _gradient(rows: int = 32, columns: int = 48, maximum: int = 4095) -> np.ndarray:
    """A uint16 ramp over the columns with a brighter square in the middle."""
    ramp = np.linspace(0, maximum // 2, columns)
    image = np.tile(ramp, (rows, 1))
    image[rows // 4 : rows * 3 // 4, columns // 4 : columns * 3 // 4] += maximum // 2
    return image.astype(np.uint16)


# Stored pixel values of the shared reference cases.


def test_reference_uncompressed_stored_pixels(cases_dir: Path, reference: np.ndarray) -> None:
    stored = read_stored_pixels(cases_dir / "ref_uncompressed_12bit_mono2.dcm")
    assert stored.shape == reference.shape
    assert np.array_equal(stored, reference)


def test_jpeg2000_lossless_exact(cases_dir: Path, reference: np.ndarray) -> None:
    stored = read_stored_pixels(cases_dir / "compressed_jpeg2000_lossless_12bit.dcm")
    assert np.array_equal(stored, reference)


def test_jpeg_baseline_close(cases_dir: Path) -> None:
    expected = np.load(cases_dir / "compressed_jpeg_baseline_8bit.expected_approx.npy").astype(np.int64)
    stored = read_stored_pixels(cases_dir / "compressed_jpeg_baseline_8bit.dcm").astype(np.int64)
    difference = np.abs(stored - expected)
    assert stored.shape == expected.shape
    assert difference.max() <= 8
    assert difference.mean() < 2.0


def test_junk_high_bits_masked(cases_dir: Path, reference: np.ndarray) -> None:
    stored = read_stored_pixels(cases_dir / "bits_stored12_junk_high_bits.dcm")
    assert stored.max() <= 4095
    assert np.array_equal(stored, reference)


def test_mono1_slope_window_regions(cases_dir: Path) -> None:
    pixels = decode_dicom(cases_dir / "mono1_rescale_slope2_window.dcm", salt=SALT).pixels
    left_lung = pixels[26:37, 16:23].mean()
    spine = pixels[20:45, 30:35].mean()
    outside_body = pixels[0:5, 0:5].mean()
    assert left_lung == pytest.approx(0.250, abs=0.01)
    assert spine == pytest.approx(0.899, abs=0.01)
    assert outside_body == pytest.approx(0.053, abs=0.01)


def test_voi_lut_sequence_with_rescale(cases_dir: Path) -> None:
    path = cases_dir / "voi_lut_sequence_with_rescale.dcm"
    expected = np.load(cases_dir / "voi_lut_sequence_with_rescale.expected_voi.npy")
    dataset = read_dataset(path)
    voi = apply_voi(apply_modality_lut(stored_pixels(dataset, path), dataset), dataset)
    assert np.array_equal(voi.values, expected)
    assert (voi.low, voi.high) == (0.0, 65535.0)


def test_no_pixel_data_error(cases_dir: Path) -> None:
    path = cases_dir / "no_pixel_data.dcm"
    with pytest.raises(BadFileError) as caught:
        decode_dicom(path, salt=SALT)
    assert caught.value.path == path
    assert str(path) in str(caught.value)
    assert "(7FE0,0010)" in caught.value.reason


def test_every_case_in_unit_range(cases_dir: Path) -> None:
    for path in sorted(cases_dir.glob("*.dcm")):
        if path.name == "no_pixel_data.dcm":
            continue
        decoded = decode_dicom(path, salt=SALT)
        assert decoded.pixels.dtype == np.float32, path.name
        assert decoded.pixels.ndim == 2, path.name
        assert decoded.pixels.min() >= 0.0, path.name
        assert decoded.pixels.max() <= 1.0, path.name


# Real chest radiographs: lungs must be darker than the spine and mediastinum.


@pytest.mark.parametrize("name", ["cxr_jpeg_baseline_mono2.dcm", "cxr_jpeg2000_mono1.dcm"])
def test_real_cxr_lungs_dark(cxr_dir: Path, name: str) -> None:
    started = time.perf_counter()
    decoded = decode_dicom(cxr_dir / name, salt=SALT)
    seconds = time.perf_counter() - started

    pixels = decoded.pixels
    height, width = pixels.shape
    rows = slice(height // 4, height * 3 // 5)
    right_lung = pixels[rows, width // 8 : width * 3 // 8].mean()
    left_lung = pixels[rows, width * 5 // 8 : width * 7 // 8].mean()
    mediastinum = pixels[rows, width * 7 // 16 : width * 9 // 16].mean()

    assert right_lung < mediastinum - 0.1
    assert left_lung < mediastinum - 0.1
    assert (right_lung + left_lung) / 2 < pixels.mean()
    assert seconds < 5.0


def test_real_cxr_metadata(cxr_dir: Path) -> None:
    decoded = decode_dicom(cxr_dir / "cxr_jpeg2000_mono1.dcm", salt=SALT)
    assert decoded.pixels.shape == (1955, 1841)
    assert decoded.metadata["PhotometricInterpretation"] == "MONOCHROME1"
    assert decoded.metadata["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.91"
    assert decoded.patient_key is not None
    assert decoded.patient_key.startswith("p-")


# Codecs and pipeline stages on files written by the tests.


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_lossless_round_trip(tmp_path: Path, transfer_syntax: UID) -> None:
    pixels = _gradient()
    path = write_dicom(tmp_path / "image.dcm", pixels, bits_stored=12, transfer_syntax=transfer_syntax)
    stored = read_stored_pixels(path)
    assert np.array_equal(stored, pixels)


def test_jpeg_baseline_round_trip(tmp_path: Path) -> None:
    pixels = (_gradient(maximum=255)).astype(np.uint8)
    path = write_dicom(tmp_path / "image.dcm", pixels, transfer_syntax=JPEGBaseline8Bit)
    stored = read_stored_pixels(path).astype(np.int64)
    assert np.abs(stored - pixels).max() <= 8


def test_signed_junk_bits_sign_extended(tmp_path: Path) -> None:
    values = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    junk = (values.view(np.uint16) & 0x0FFF) | 0xA000
    path = write_dicom(tmp_path / "signed.dcm", junk.view(np.int16), bits_stored=12)
    assert np.array_equal(read_stored_pixels(path), values)


def test_rescale_no_uint16_overflow(tmp_path: Path) -> None:
    pixels = np.array([[0, 40000, 65535]], dtype=np.uint16)
    path = write_dicom(tmp_path / "wide.dcm", pixels, RescaleSlope=4, RescaleIntercept=-1024)
    dataset = read_dataset(path)
    modality = apply_modality_lut(stored_pixels(dataset, path), dataset)
    assert modality.dtype == np.float64
    assert modality.tolist() == [[-1024.0, 158976.0, 261116.0]]


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_modality_lut_sequence(tmp_path: Path, vr: str) -> None:
    pixels = np.array([[0, 1, 2, 3, 9]], dtype=np.uint16)
    entries = [100, 200, 300, 400]
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 1, 16])
    lut.add_new("LUTData", vr, entries if vr == "US" else np.array(entries, dtype="<u2").tobytes())
    path = write_dicom(tmp_path / "lut.dcm", pixels, ModalityLUTSequence=[lut])
    dataset = read_dataset(path)
    modality = apply_modality_lut(stored_pixels(dataset, path), dataset)
    # Values below the first mapped value take the first entry, values past the end the last.
    assert modality.tolist() == [[100.0, 100.0, 200.0, 300.0, 400.0]]


def test_multi_valued_window_first_pair(tmp_path: Path) -> None:
    pixels = np.array([[0, 50, 100, 150, 200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "window.dcm", pixels, WindowCenter=[100, 1000], WindowWidth=[101, 10])
    decoded = decode_dicom(path, salt=SALT).pixels
    assert decoded[0, 0] == 0.0
    assert decoded[0, 2] == pytest.approx(0.5, abs=0.01)
    assert decoded[0, 4] == 1.0


def test_sigmoid_window(tmp_path: Path) -> None:
    pixels = np.array([[0, 100, 200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "sigmoid.dcm", pixels, WindowCenter=100, WindowWidth=50, VOILUTFunction="SIGMOID")
    decoded = decode_dicom(path, salt=SALT).pixels
    assert decoded[0, 1] == pytest.approx(0.5)
    assert decoded[0, 0] < 0.01
    assert decoded[0, 2] > 0.99


def test_invalid_window_falls_back(tmp_path: Path) -> None:
    pixels = np.array([[10, 20, 30]], dtype=np.uint16)
    path = write_dicom(tmp_path / "zero_width.dcm", pixels, WindowCenter=20, WindowWidth=0)
    decoded = decode_dicom(path, salt=SALT).pixels
    assert decoded.tolist() == [[0.0, 0.5, 1.0]]


def test_no_window_min_max(tmp_path: Path) -> None:
    pixels = np.array([[1000, 1500, 2000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=12)
    assert decode_dicom(path, salt=SALT).pixels.tolist() == [[0.0, 0.5, 1.0]]


def test_constant_image_zeros(tmp_path: Path) -> None:
    pixels = np.full((4, 4), 700, dtype=np.uint16)
    path = write_dicom(tmp_path / "flat.dcm", pixels)
    decoded = decode_dicom(path, salt=SALT).pixels
    assert not np.isnan(decoded).any()
    assert decoded.max() == 0.0


def test_monochrome1_inverted(tmp_path: Path) -> None:
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    mono2 = decode_dicom(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12), salt=SALT).pixels
    mono1 = decode_dicom(
        write_dicom(tmp_path / "m1.dcm", pixels, bits_stored=12, photometric="MONOCHROME1"), salt=SALT
    ).pixels
    assert mono2.tolist() == [[0.0, 1.0]]
    assert mono1.tolist() == [[1.0, 0.0]]


def test_multi_frame_first_frame(tmp_path: Path) -> None:
    frames = np.stack([_gradient(), 4095 - _gradient()])
    path = write_dicom(tmp_path / "frames.dcm", frames, bits_stored=12)
    decoded = decode_dicom(path, salt=SALT)
    assert decoded.pixels.shape == frames.shape[1:]
    assert np.array_equal(read_stored_pixels(path), frames[0])
    assert decoded.metadata["NumberOfFrames"] == "2"


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEGBaseline8Bit])
def test_rgb_to_grey(tmp_path: Path, transfer_syntax: UID) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, :8] = (255, 255, 255)
    rgb[:, 8:] = (0, 255, 0)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", transfer_syntax=transfer_syntax)
    decoded = decode_dicom(path, salt=SALT).pixels
    assert decoded.shape == (16, 16)
    assert decoded[:, :4].mean() == pytest.approx(1.0, abs=0.02)
    assert decoded[:, 12:].mean() == pytest.approx(0.587, abs=0.03)


# Per-file errors.


def test_truncated_native_file(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", _gradient(), bits_stored=12)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(BadFileError, match="truncated") as caught:
        decode_dicom(path, salt=SALT)
    assert caught.value.path == path


def test_truncated_compressed_file(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", _gradient(), bits_stored=12, transfer_syntax=JPEG2000Lossless)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BadFileError, match="truncated") as caught:
        decode_dicom(path, salt=SALT)
    assert "(7FE0,0010)" in caught.value.reason


def test_not_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not an image\n" * 20)
    with pytest.raises(BadFileError, match="not a DICOM file") as caught:
        decode_dicom(path, salt=SALT)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadFileError, match="failed to read"):
        decode_dicom(tmp_path / "absent.dcm", salt=SALT)


def test_transfer_syntax_without_decoder(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "video.dcm", np.zeros((4, 4), dtype=np.uint16))
    dataset = read_dataset(path)
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(20)])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path)
    with pytest.raises(BadFileError, match="has no decoder for transfer syntax") as caught:
        decode_dicom(path, salt=SALT)
    assert str(MPEG2MPML) in caught.value.reason


def test_missing_plugin_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "j2k.dcm", _gradient(), bits_stored=12, transfer_syntax=JPEG2000Lossless)

    class UnavailableDecoder:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-openjpeg"]

    monkeypatch.setattr("aeplat.data.dicom.get_decoder", lambda uid: UnavailableDecoder())
    with pytest.raises(BadFileError, match="pip install pylibjpeg pylibjpeg-openjpeg"):
        decode_dicom(path, salt=SALT)


def test_missing_decoder_reason_text() -> None:
    reason = missing_decoder_reason(JPEGBaseline8Bit, "pylibjpeg pylibjpeg-libjpeg", [])
    assert "JPEG Baseline" in reason
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in reason


def test_palette_colour_to_grey(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2]], dtype=np.uint8)
    red = np.array([0, 65535, 0] + [0] * 253, dtype="<u2")
    green = np.array([0, 65535, 65535] + [0] * 253, dtype="<u2")
    blue = np.array([0, 65535, 0] + [0] * 253, dtype="<u2")
    attributes = {}
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        attributes[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        attributes[f"{colour}PaletteColorLookupTableData"] = table.tobytes()
    path = write_dicom(tmp_path / "palette.dcm", indices, photometric="PALETTE COLOR", **attributes)

    decoded = decode_dicom(path, salt=SALT).pixels
    assert decoded.shape == (1, 3)
    np.testing.assert_allclose(decoded, [[0.0, 1.0, 0.587]], atol=1e-3)
