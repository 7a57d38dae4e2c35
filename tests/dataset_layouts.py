"""Build rsna, vindr and folder layouts from real images for adapter tests: `from dataset_layouts import ...`.

No real RSNA or VinDr DICOM file is available, so real pixels are wrapped into DICOM files
named as the challenges name them, next to real label rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

CHEST_XRAY_PATIENT_PATTERN = r"^(?P<patient>(?:NORMAL2-)?IM-\d+|person\d+)"

# VinDr-CXR boxes are drawn on images of up to about 3000 pixels. The stand-in images have
# 224 pixels, so the test label files scale the real boxes by this factor.
VINDR_BOX_SCALE = 224 / 3072


def write_mono2_dicom(path: Path, pixels: np.ndarray, patient_id: str) -> Path:
    """Write 8-bit greyscale pixels as an uncompressed MONOCHROME2 DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = patient_id
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def rsna_rows(shared_dir: Path) -> list[dict[str, str]]:
    """Return the rows of the 64-pixel NIH images that are RSNA patients (path, rsna_patientId, rsna_class, ...)."""
    with (shared_dir / "data" / "rsna" / "nih_png_64px_labels.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def build_rsna(shared_dir: Path, root: Path, image_format: str = "dicom") -> Path:
    """Write an RSNA layout: official label rows and class info of 247 patients, images as DICOM or PNG.

    Returns the data folder: `stage_2_train_labels.csv`, `stage_2_detailed_class_info.csv`
    and `stage_2_train_images/<patientId>.dcm` (or `.png`).
    """
    rows = rsna_rows(shared_dir)
    patients = {row["rsna_patientId"] for row in rows}
    with zipfile.ZipFile(shared_dir / "data" / "rsna" / "kaggle_stage_2_train_labels.csv.zip") as archive:
        text = archive.read("stage_2_train_labels.csv").decode("utf-8")
    lines = text.splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in patients]

    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(kept) + "\n")
    with (root / "stage_2_detailed_class_info.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["patientId", "class"])
        for row in rows:
            writer.writerow([row["rsna_patientId"], row["rsna_class"]])

    images = root / "stage_2_train_images"
    images.mkdir(exist_ok=True)
    for row in rows:
        source = shared_dir / "data" / "rsna" / "nih_png_64px" / Path(row["path"]).relative_to("NIH1000")
        if image_format == "dicom":
            write_mono2_dicom(images / f"{row['rsna_patientId']}.dcm", _grey(source), row["rsna_patientId"])
        else:
            (images / f"{row['rsna_patientId']}.png").symlink_to(source)
    return root


def build_vindr(shared_dir: Path, root: Path, per_class: int = 100) -> Path:
    """Write a VinDr-CXR layout: real label rows of 2*per_class image ids, real chest X-ray pixels as `.dicom`.

    Normal ids (every row "No finding") get NORMAL chest X-rays and the others PNEUMONIA
    ones, so the stand-in pixels agree with the labels. Boxes are scaled by VINDR_BOX_SCALE.
    """
    with gzip.open(shared_dir / "data" / "vindr" / "vinbigdata-train.csv.gz", "rt", newline="") as stream:
        table = list(csv.DictReader(stream))

    by_image: dict[str, list[dict[str, str]]] = {}
    for row in table:
        by_image.setdefault(row["image_id"], []).append(row)
    ordered = sorted(by_image)
    normal = [image for image in ordered if all(row["class_name"] == "No finding" for row in by_image[image])][:per_class]
    abnormal = [image for image in ordered if all(row["class_name"] != "No finding" for row in by_image[image])][:per_class]

    xray = shared_dir / "data" / "chest_xray" / "train"
    sources = {"NORMAL": sorted((xray / "NORMAL").iterdir()), "PNEUMONIA": sorted((xray / "PNEUMONIA").iterdir())}
    root.mkdir(parents=True, exist_ok=True)
    for ids, folder in ((normal, "NORMAL"), (abnormal, "PNEUMONIA")):
        for image_id, source in zip(ids, sources[folder]):
            write_mono2_dicom(root / "train" / f"{image_id}.dicom", _grey(source), image_id)

    with (root / "train.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(table[0]))
        writer.writeheader()
        for image_id in (*normal, *abnormal):
            for row in by_image[image_id]:
                writer.writerow({**row, **_scaled_box(row)})
    return root


def _scaled_box(row: dict[str, str]) -> dict[str, str]:
    return {key: f"{float(row[key]) * VINDR_BOX_SCALE:.1f}" for key in ("x_min", "y_min", "x_max", "y_max") if row[key]}


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
