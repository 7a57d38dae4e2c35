"""The registered pyfunc scoring model against Trainer.score, for every accepted input kind."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from deploy_support import CHAMPION_URI, IMAGE_SIZE, TOLERANCE, tracking_store, trainer_scores
from mlflow.exceptions import MlflowException
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from aeplat.data import read_image
from aeplat.data.preprocess import resize_images
from aeplat.deploy import load_error_map_model, score_images
from aeplat.trainers.scoring import reconstruction_error_map


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom_bytes(pixels: np.ndarray) -> bytes:
    """Return a minimal uncompressed MR DICOM file of 12-bit pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.round(pixels * 4095).astype(np.uint16).tobytes()

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _nifti_bytes(voxels: np.ndarray, suffix: str) -> bytes:
    image = nib.Nifti1Image(voxels.astype(np.float32), np.eye(4))
    return image.to_bytes() if suffix == ".nii" else _gzip(image.to_bytes())


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _decoded_file_scores(trainer, tmp_path: Path, name: str, data: bytes) -> np.ndarray:
    """Score a file the way a 2-D dataset adapter prepares it for training."""
    path = tmp_path / name
    path.write_bytes(data)
    pixels = read_image(path).pixels
    return trainer_scores(trainer, resize_images(pixels[np.newaxis], IMAGE_SIZE))


def test_array_scores_equal_trainer_scores(scoring_model, trainer, case_slices) -> None:
    images = case_slices.images

    output = scoring_model.predict(images)

    assert output["score"].shape == (len(images),)
    assert output["score"].dtype == np.float64
    np.testing.assert_allclose(output["score"], trainer.score(images), rtol=0, atol=TOLERANCE)


def test_error_maps_equal_trainer_maps(scoring_model, trainer, case_slices) -> None:
    images = case_slices.images[:8]
    trainer.model.eval()
    with torch.inference_mode():
        expected = reconstruction_error_map(trainer.model, torch.from_numpy(images)).numpy()

    output = scoring_model.predict(images)

    assert output["error_map"].shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(output["error_map"], expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(output["score"], output["error_map"].mean(axis=(1, 2, 3)), rtol=1e-6)


def test_array_shapes_give_same_scores(scoring_model, case_slices) -> None:
    images = case_slices.images[:3]

    batch = scoring_model.predict(images)["score"]
    squeezed = scoring_model.predict(images[:, 0])["score"]
    single = scoring_model.predict(images[1, 0])["score"]
    as_list = scoring_model.predict([image for image in images[:, 0]])["score"]

    # A batch of one may take another CPU kernel than a batch of three, which changes the last bits.
    np.testing.assert_allclose(squeezed, batch, rtol=1e-6)
    np.testing.assert_allclose(single, batch[1:2], rtol=1e-6)
    np.testing.assert_allclose(as_list, batch, rtol=1e-6)


def test_larger_array_is_resized_as_in_training(scoring_model, trainer) -> None:
    rng = np.random.default_rng(1)
    images = rng.random((2, 48, 40), dtype=np.float32)

    output = scoring_model.predict(images)

    expected = trainer.score(resize_images(images, IMAGE_SIZE))
    np.testing.assert_allclose(output["score"], expected, rtol=0, atol=TOLERANCE)


def test_volume_scores_equal_training_slices(scoring_model, trainer, case_slices, volume_path: Path) -> None:
    frame = pd.DataFrame({"image": [volume_path.read_bytes()]})

    output = scoring_model.predict(frame)

    np.testing.assert_array_equal(output["slice_index"], case_slices.slice_indices)
    np.testing.assert_array_equal(output["input_index"], np.zeros(len(case_slices), dtype=np.int64))
    np.testing.assert_allclose(output["score"], trainer.score(case_slices.images), rtol=0, atol=TOLERANCE)


def test_base64_text_equals_raw_bytes(scoring_model, case_slices) -> None:
    data = _png_bytes(case_slices.images[40, 0])

    from_bytes = scoring_model.predict(pd.DataFrame({"image": [data]}))["score"]
    from_text = scoring_model.predict(pd.DataFrame({"image": [base64.b64encode(data).decode()]}))["score"]
    from_dict = scoring_model.predict({"image": [base64.b64encode(data).decode()]})["score"]

    np.testing.assert_array_equal(from_text, from_bytes)
    np.testing.assert_array_equal(from_dict, from_bytes)


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom", "nifti", "nifti-gz", "npy"])
def test_file_scores_equal_training_decoding(scoring_model, trainer, case_slices, tmp_path: Path, kind: str) -> None:
    pixels = case_slices.images[40, 0]
    rows = np.pad(pixels, ((4, 4), (0, 0)))
    data, name = {
        "png": (_png_bytes(rows), "image.png"),
        "jpeg": (None, "image.jpg"),
        "dicom": (_dicom_bytes(rows), "image.dcm"),
        "nifti": (_nifti_bytes(rows[:, :, np.newaxis] * 800.0, ".nii"), "image.nii"),
        "nifti-gz": (_nifti_bytes(rows[:, :, np.newaxis] * 800.0, ".nii.gz"), "image.nii.gz"),
        "npy": (None, "image.npy"),
    }[kind]
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(np.round(rows * 255).astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, rows)
        data = buffer.getvalue()

    output = scoring_model.predict([data])

    if kind == "npy":
        expected = trainer_scores(trainer, resize_images(rows[np.newaxis], IMAGE_SIZE))
    elif kind.startswith("nifti"):
        # The 2-D adapters read NIfTI images without reorientation, in stored voxel order.
        from aeplat.data.adapters.records import read_pixels

        path = tmp_path / name
        path.write_bytes(data)
        expected = trainer_scores(trainer, resize_images(read_pixels(path)[0][np.newaxis], IMAGE_SIZE))
    else:
        expected = _decoded_file_scores(trainer, tmp_path, name, data)
    assert output["slice_index"].tolist() == [-1]
    np.testing.assert_allclose(output["score"], expected, rtol=0, atol=TOLERANCE)


def test_include_images_returns_model_input(scoring_model, case_slices) -> None:
    images = case_slices.images[:2]

    output = scoring_model.predict(images, params={"include_images": True})
    default = scoring_model.predict(images)

    np.testing.assert_array_equal(output["image"], images)
    assert "image" not in default


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (np.full((2, 32, 32), 3.0, dtype=np.float32), "must be intensity-normalised to \\[0, 1\\]"),
        (np.full((1, 32, 32), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((2, 3, 32, 32), dtype=np.float32), "\\(N, 1, H, W\\) is expected"),
        ([b"not an image at all"], "Input 0: .*not a PNG, JPEG, DICOM"),
        (["%%% not base64 %%%"], "Input 0: .*not valid base64"),
        (pd.DataFrame({"picture": [b"x"]}), "an 'image' column"),
        ({"pixels": [b"x"]}, "an 'image' key"),
        ([], "contains no image"),
        (12.5, "Unsupported input type float"),
    ],
)
def test_invalid_input_is_rejected(scoring_model, model_input, message: str) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        scoring_model.predict(model_input)

    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_bad_second_input_names_its_position(scoring_model, case_slices) -> None:
    good = _png_bytes(case_slices.images[40, 0])

    with pytest.raises(MlflowException, match="Input 1: "):
        scoring_model.predict([good, _png_bytes(case_slices.images[40, 0])[:60]])


def test_error_map_model_still_loads(registered_model: dict, trainer, case_slices) -> None:
    with tracking_store(registered_model["tracking_uri"]):
        network = load_error_map_model(CHAMPION_URI, dst_path=registered_model["work"] / "network")

    scores, maps = score_images(network, case_slices.images[:4])

    assert maps.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(scores, trainer.score(case_slices.images[:4]), rtol=0, atol=TOLERANCE)


def test_score_images_accepts_pyfunc_model(scoring_model, trainer, case_slices) -> None:
    scores, maps = score_images(scoring_model, case_slices.images[:4])

    assert maps.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(scores, trainer.score(case_slices.images[:4]), rtol=0, atol=TOLERANCE)


def test_model_files_hold_config_and_code(registered_model: dict) -> None:
    from mlflow.models import Model

    local = registered_model["work"] / "download"
    model = Model.load(str(local))
    flavor = model.flavors["python_function"]

    assert set(flavor["artifacts"]) == {"error_map_model", "serving_config"}
    assert (local / "code" / "aeplat" / "deploy" / "inputs.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    assert model.signature.inputs is None
    assert [param.name for param in model.signature.params.params] == ["include_images"]
    config = (local / flavor["artifacts"]["serving_config"]["path"]).read_text()
    assert '"image_size": 32' in config
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements
    assert "pydicom==" in requirements
