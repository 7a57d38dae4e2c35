"""The slice cache: fingerprints, keys, atomic entries, corrupt entries and prepare_brats."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aeplat.data import (
    BratsSettings,
    DatasetError,
    SliceCache,
    SliceSet,
    cache_key,
    default_cache_dir,
    fingerprint_files,
    prepare_brats,
)

SMALL = BratsSettings(image_size=16)


def make_slices(count: int = 3, with_masks: bool = True) -> SliceSet:
    rng = np.random.default_rng(0)
    return SliceSet(
        images=rng.uniform(0, 1, size=(count, 1, 8, 8)).astype(np.float32),
        labels=np.arange(count, dtype=np.int64) % 2,
        masks=(rng.uniform(size=(count, 1, 8, 8)) > 0.5).astype(np.uint8) if with_masks else None,
        patient_ids=np.array([f"case{index}" for index in range(count)], np.str_),
        slice_indices=np.arange(count, dtype=np.int64) + 10,
    )


def assert_same_slices(first: SliceSet, second: SliceSet) -> None:
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.patient_ids, second.patient_ids)
    assert np.array_equal(first.slice_indices, second.slice_indices)
    if first.masks is None:
        assert second.masks is None
    else:
        assert np.array_equal(first.masks, second.masks)


def leftover_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.endswith(".npz"))


def write_files(folder: Path, contents: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in contents.items():
        path = folder / name
        path.write_bytes(content)
        paths.append(path)
    return paths


def test_fingerprint_independent_of_location_and_order(tmp_path: Path) -> None:
    first = write_files(tmp_path / "one" / "case", {"a.nii.gz": b"alpha", "b.nii.gz": b"beta"})
    second = write_files(tmp_path / "two" / "deeper" / "case", {"a.nii.gz": b"alpha", "b.nii.gz": b"beta"})

    assert fingerprint_files(first) == fingerprint_files(reversed(second))


def test_fingerprint_changes_with_one_byte(tmp_path: Path) -> None:
    paths = write_files(tmp_path, {"a.nii.gz": b"alpha", "b.nii.gz": b"beta"})
    before = fingerprint_files(paths)

    paths[1].write_bytes(b"betb")

    assert fingerprint_files(paths) != before


def test_fingerprint_changes_with_name(tmp_path: Path) -> None:
    original = write_files(tmp_path / "one" / "case", {"a.nii.gz": b"alpha"})
    renamed = write_files(tmp_path / "two" / "case", {"b.nii.gz": b"alpha"})

    assert fingerprint_files(original) != fingerprint_files(renamed)


def test_fingerprint_missing_file_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "missing.nii.gz"

    with pytest.raises(DatasetError, match="missing.nii.gz"):
        fingerprint_files([missing])


def test_cache_key_depends_on_inputs() -> None:
    key = cache_key("abc", {"image_size": 64, "modality": "flair"})

    assert len(key) == 24
    assert int(key, 16) >= 0
    assert key == cache_key("abc", {"modality": "flair", "image_size": 64})
    assert key != cache_key("abd", {"image_size": 64, "modality": "flair"})
    assert key != cache_key("abc", {"image_size": 128, "modality": "flair"})
    assert key != cache_key("abc", {"image_size": 64, "modality": "t2"})


@pytest.mark.parametrize("with_masks", [True, False])
def test_cache_round_trip(tmp_path: Path, with_masks: bool) -> None:
    cache = SliceCache(tmp_path / "cache")
    slices = make_slices(with_masks=with_masks)

    path = cache.save("key", slices)
    loaded = cache.load("key")

    assert path == tmp_path / "cache" / "key.npz"
    assert loaded is not None
    assert_same_slices(slices, loaded)
    assert loaded.patient_ids.dtype.kind == "U"
    assert leftover_files(tmp_path / "cache") == []


def test_missing_entry_returns_none(tmp_path: Path) -> None:
    assert SliceCache(tmp_path).load("absent") is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_dtype", "missing_array"])
def test_corrupt_entry_deleted(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    cache = SliceCache(tmp_path)
    path = cache.save("key", make_slices())
    if damage == "garbage":
        path.write_bytes(b"not a zip file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "wrong_dtype":
        slices = make_slices()
        np.savez(path, images=slices.images.astype(np.float64), labels=slices.labels,
                 patient_ids=slices.patient_ids, slice_indices=slices.slice_indices)
    else:
        np.savez(path, images=make_slices().images)

    with caplog.at_level(logging.WARNING, logger="aeplat.data.cache"):
        loaded = cache.load("key")

    assert loaded is None
    assert not path.exists()
    assert "Deleting corrupt cache entry" in caplog.text
    assert str(path) in caplog.text


def test_failed_save_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_savez(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail_savez)

    with pytest.raises(OSError, match="disk full"):
        SliceCache(tmp_path).save("key", make_slices())
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AEPLAT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "aeplat"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "aeplat"

    monkeypatch.setenv("AEPLAT_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_prepare_hits_cache_on_second_call(synthetic_case_copy: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    calls = []

    first = prepare_brats(synthetic_case_copy, SMALL, cache_dir)
    second = prepare_brats(synthetic_case_copy, SMALL, cache_dir, progress=lambda done, total: calls.append((done, total)))

    assert not first.cache_hit
    assert second.cache_hit
    assert second.cache_key == first.cache_key
    assert second.source_files == 2
    assert calls == [(1, 1)]
    assert_same_slices(first.slices, second.slices)
    assert [path.name for path in cache_dir.iterdir()] == [f"{first.cache_key}.npz"]


def test_prepare_key_follows_settings(synthetic_case_copy: Path, tmp_path: Path) -> None:
    keys = {
        prepare_brats(synthetic_case_copy, settings, tmp_path / "cache").cache_key
        for settings in (SMALL, BratsSettings(image_size=32), BratsSettings(image_size=16, modality="t2"))
    }

    assert len(keys) == 3


def test_prepare_key_follows_file_content(synthetic_case_copy: Path, tmp_path: Path) -> None:
    before = prepare_brats(synthetic_case_copy, SMALL, tmp_path / "cache")
    segmentation_path = next(synthetic_case_copy.glob("*/*_seg.nii.gz"))
    segmentation = nib.load(segmentation_path)
    voxels = np.asanyarray(segmentation.dataobj).copy()
    voxels[voxels == 2] = 1
    nib.save(nib.Nifti1Image(voxels, segmentation.affine, segmentation.header), segmentation_path)

    after = prepare_brats(synthetic_case_copy, SMALL, tmp_path / "cache")

    assert after.cache_key != before.cache_key
    assert not after.cache_hit


def test_prepare_key_ignores_other_modalities(synthetic_case_copy: Path, tmp_path: Path) -> None:
    before = prepare_brats(synthetic_case_copy, SMALL, tmp_path / "cache")
    t2_path = next(synthetic_case_copy.glob("*/*_t2.nii.gz"))
    t2_path.write_bytes(t2_path.read_bytes() + b"\0")

    after = prepare_brats(synthetic_case_copy, SMALL, tmp_path / "cache")

    assert after.cache_key == before.cache_key
    assert after.cache_hit


def test_prepare_key_independent_of_location(synthetic_case_copy: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "brats"
    shutil.copytree(synthetic_case_copy, moved)

    first = prepare_brats(synthetic_case_copy, SMALL, tmp_path / "cache")
    second = prepare_brats(moved, SMALL, tmp_path / "cache")

    assert second.cache_key == first.cache_key
    assert second.cache_hit


def test_prepare_rebuilds_corrupt_entry(
    synthetic_case_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    first = prepare_brats(synthetic_case_copy, SMALL, cache_dir)
    entry = cache_dir / f"{first.cache_key}.npz"
    entry.write_bytes(entry.read_bytes()[:1000])

    with caplog.at_level(logging.WARNING, logger="aeplat.data.cache"):
        rebuilt = prepare_brats(synthetic_case_copy, SMALL, cache_dir)
    again = prepare_brats(synthetic_case_copy, SMALL, cache_dir)

    assert not rebuilt.cache_hit
    assert str(entry) in caplog.text
    assert again.cache_hit
    assert_same_slices(first.slices, again.slices)
    assert leftover_files(cache_dir) == []


def test_prepare_without_cache(synthetic_case_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEPLAT_CACHE_DIR", str(tmp_path / "default"))

    first = prepare_brats(synthetic_case_copy, SMALL, None)
    second = prepare_brats(synthetic_case_copy, SMALL, None)

    assert not first.cache_hit
    assert not second.cache_hit
    assert not (tmp_path / "default").exists()


def test_prepare_continues_when_cache_unwritable(
    synthetic_case_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")

    with caplog.at_level(logging.WARNING, logger="aeplat.data.cache"):
        prepared = prepare_brats(synthetic_case_copy, SMALL, blocked)

    assert len(prepared.slices) == 24
    assert "Failed to write cache entry" in caplog.text
