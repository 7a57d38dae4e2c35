"""`aeplat score`: a table of scores, heatmap PNGs, and clear errors for bad files and missing models."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from deploy_support import MODEL_NAME, TOLERANCE, tracking_store
from PIL import Image

from aeplat.platform.cli import main
from aeplat.platform.cli_score import model_uri_from_argument


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(path)
    return path


def _score(argv: list[str], tracking_uri: str) -> int:
    # main() points MLflow at --tracking-uri, and tracking_store restores the URIs afterwards.
    with tracking_store(tracking_uri):
        return main(["score", *argv, "--tracking-uri", tracking_uri])


def test_score_prints_table_and_writes_heatmaps(registered_model: dict, case_slices, tmp_path: Path, capsys) -> None:
    first = _write_png(tmp_path / "first.png", case_slices.images[40, 0])
    second = _write_png(tmp_path / "nested-second.png", case_slices.images[60, 0])
    output_dir = tmp_path / "heatmaps"

    code = _score([str(first), str(second), "--model", f"{MODEL_NAME}@champion", "--output-dir", str(output_dir)], registered_model["tracking_uri"])

    assert code == 0
    table = capsys.readouterr().out
    assert "first.png" in table
    assert "nested-second.png" in table
    for name in ("first.png", "nested-second.png"):
        with Image.open(output_dir / name) as heatmap:
            assert heatmap.format == "PNG"
            assert heatmap.width > 200
    rows = list(csv.DictReader((output_dir / "scores.csv").open()))
    assert [Path(row["file"]).name for row in rows] == ["first.png", "nested-second.png"]
    assert all(float(row["score"]) > 0 for row in rows)


def test_score_matches_pyfunc_on_same_file(registered_model: dict, scoring_model, case_slices, tmp_path: Path) -> None:
    image = _write_png(tmp_path / "slice.png", case_slices.images[40, 0])
    output_dir = tmp_path / "out"

    code = _score([str(image), "--model", f"models:/{MODEL_NAME}/1", "--output-dir", str(output_dir)], registered_model["tracking_uri"])

    assert code == 0
    row = next(csv.DictReader((output_dir / "scores.csv").open()))
    expected = scoring_model.predict([image.read_bytes()])["score"][0]
    assert float(row["score"]) == pytest.approx(expected, abs=TOLERANCE)


def test_score_volume_lists_every_slice(registered_model: dict, case_slices, volume_path: Path, tmp_path: Path, capsys) -> None:
    code = _score([str(volume_path), "--model", f"{MODEL_NAME}@champion"], registered_model["tracking_uri"])

    assert code == 0
    table = capsys.readouterr().out
    assert table.count(volume_path.name) == len(case_slices)
    assert not list(tmp_path.iterdir())


def test_unreadable_file_fails_others_scored(registered_model: dict, case_slices, tmp_path: Path, capsys) -> None:
    good = _write_png(tmp_path / "good.png", case_slices.images[40, 0])
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 64)
    missing = tmp_path / "missing.png"

    code = _score([str(good), str(broken), str(missing), "--model", f"{MODEL_NAME}@champion", "--output-dir", str(tmp_path / "out")], registered_model["tracking_uri"])

    captured = capsys.readouterr()
    assert code == 1
    rows = {Path(row["file"]).name: row for row in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    assert float(rows["good.png"]["score"]) > 0
    assert "not a PNG, JPEG, DICOM" in rows["broken.dcm"]["error"]
    assert "No such file or directory" in rows["missing.png"]["error"]
    assert "2 of 3 files were not scored" in " ".join(captured.err.split())


def test_missing_alias_is_a_clear_error(registered_model: dict, tmp_path: Path, capsys) -> None:
    image = _write_png(tmp_path / "image.png", np.zeros((32, 32), dtype=np.float32))

    code = _score([str(image), "--model", f"{MODEL_NAME}@production"], registered_model["tracking_uri"])

    message = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "failed to load model models:/brats-flair@production" in message
    assert "production" in message
    assert "--tracking-uri" in message


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    image = _write_png(tmp_path / "image.png", np.zeros((32, 32), dtype=np.float32))
    empty_store = f"sqlite:///{tmp_path / 'empty.db'}"

    code = _score([str(image), "--model", "no-such-model@champion"], empty_store)

    message = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "failed to load model models:/no-such-model@champion" in message


@pytest.mark.parametrize(
    ("argument", "uri"),
    [
        ("brats-flair@champion", "models:/brats-flair@champion"),
        ("brats-flair/3", "models:/brats-flair/3"),
        ("runs:/abc/model", "runs:/abc/model"),
        ("/srv/models/brats", "/srv/models/brats"),
    ],
)
def test_model_argument_becomes_uri(argument: str, uri: str) -> None:
    assert model_uri_from_argument(argument) == uri

