"""Bad-file policies of dataset preparation on a small folder dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aeplat.data.adapters import get_adapter
from aeplat.data.adapters.base import DataOptions
from aeplat.data.errors import DatasetError
from aeplat.data.prepare import prepare_dataset


def _write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"image_{seed}_{index}.png")


@pytest.fixture()
def dataset_with_two_bad_files(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _write_images(root / "NORMAL", 6, seed=1)
    _write_images(root / "ABNORMAL", 4, seed=2)
    (root / "NORMAL" / "notes.png").write_text("this is text, not an image")
    good = (root / "ABNORMAL" / "image_2_0.png").read_bytes()
    (root / "ABNORMAL" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _prepare(data_dir: Path, on_bad_file: str, **options: object):
    adapter = get_adapter("folder")
    defaults = {"image_size": 32, "normal_classes": ("NORMAL",), "abnormal_classes": ("ABNORMAL",)}
    settings = adapter.settings_from_options(DataOptions(**{**defaults, **options}))
    return prepare_dataset(adapter, data_dir, settings, cache_dir=None, on_bad_file=on_bad_file)


def test_fail_policy_lists_every_bad_file(dataset_with_two_bad_files: Path) -> None:
    with pytest.raises(DatasetError) as raised:
        _prepare(dataset_with_two_bad_files, "fail")

    message = str(raised.value)
    assert "2 input file(s)" in message
    assert "NORMAL/notes.png" in message
    assert "ABNORMAL/truncated.png" in message


def test_skip_policy_keeps_good_files(dataset_with_two_bad_files: Path) -> None:
    prepared = _prepare(dataset_with_two_bad_files, "skip")

    assert len(prepared.slices) == 10
    assert sorted(bad.name for bad in prepared.skipped) == ["ABNORMAL/truncated.png", "NORMAL/notes.png"]


def test_missing_class_folder_named(dataset_with_two_bad_files: Path) -> None:
    with pytest.raises(DatasetError, match="NOPE") as raised:
        _prepare(dataset_with_two_bad_files, "skip", abnormal_classes=("ABNORMAL", "NOPE"))

    assert "Folders found: ABNORMAL, NORMAL" in str(raised.value)
