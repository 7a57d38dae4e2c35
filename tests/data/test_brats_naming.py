"""Finding BraTS case folders: file naming schemes, settings and the errors for incomplete data."""

from __future__ import annotations

from pathlib import Path

import pytest

from aeplat.data import BratsSettings, DatasetError, find_brats_cases, parse_brats_file_name


def make_case(data_dir: Path, folder: str, file_names: list[str]) -> Path:
    """Create a case folder with empty files; finding cases never opens them."""
    case_dir = data_dir / folder
    case_dir.mkdir(parents=True)
    for name in file_names:
        (case_dir / name).touch()
    return case_dir


@pytest.mark.parametrize(
    ("file_name", "case_id", "kind"),
    [
        ("Brats18_2013_11_1_flair.nii.gz", "Brats18_2013_11_1", "flair"),
        ("Brats18_CBICA_ABM_1_t1ce.nii.gz", "Brats18_CBICA_ABM_1", "t1ce"),
        ("Brats18_TCIA01_201_1_t1.nii.gz", "Brats18_TCIA01_201_1", "t1"),
        ("Brats18_TCIA01_201_1_seg.nii", "Brats18_TCIA01_201_1", "seg"),
        ("BraTS2021_00006_t2.nii.gz", "BraTS2021_00006", "t2"),
        ("BraTS2021_00006_seg.nii.gz", "BraTS2021_00006", "seg"),
        ("BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000", "flair"),
        ("BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000", "t1"),
        ("BraTS-GLI-00000-000-t1c.nii.gz", "BraTS-GLI-00000-000", "t1ce"),
        ("BraTS-MEN-00004-001-t2w.nii.gz", "BraTS-MEN-00004-001", "t2"),
        ("BraTS-GLI-00000-000-seg.nii.gz", "BraTS-GLI-00000-000", "seg"),
    ],
)
def test_file_name_parsed(file_name: str, case_id: str, kind: str) -> None:
    parsed = parse_brats_file_name(file_name)

    assert parsed is not None
    assert parsed[1:] == (case_id, kind)


@pytest.mark.parametrize(
    "file_name",
    [
        "README.md",
        "Brats18_2013_11_1_mask.nii.gz",
        "BraTS2021_00006_flair.nii.gz.bak",
        "BraTS2021_00006_flair.mha",
        "BraTS-GLI-00000-000-flair.nii.gz",
        "brats2021_00006_flair.nii.gz",
    ],
)
def test_file_name_ignored(file_name: str) -> None:
    assert parse_brats_file_name(file_name) is None


def test_brats2023_file_name_round_trip() -> None:
    scheme, case_id, kind = parse_brats_file_name("BraTS-GLI-00000-000-t1c.nii.gz")

    assert scheme.name == "BraTS 2023"
    assert scheme.file_name(case_id, kind) == "BraTS-GLI-00000-000-t1c.nii.gz"


def test_find_cases_of_three_schemes(tmp_path: Path) -> None:
    make_case(tmp_path, "b21", ["BraTS2021_00006_flair.nii.gz", "BraTS2021_00006_t1.nii.gz", "BraTS2021_00006_seg.nii.gz"])
    make_case(tmp_path, "b18", ["Brats18_2013_11_1_flair.nii.gz", "Brats18_2013_11_1_seg.nii.gz", "notes.txt"])
    make_case(tmp_path, "b23", ["BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000-seg.nii.gz"])
    make_case(tmp_path, ".hidden", ["BraTS2021_00001_flair.nii.gz"])
    make_case(tmp_path, "unrelated", ["scan.nii.gz"])
    (tmp_path / "README.txt").touch()

    cases = find_brats_cases(tmp_path, "flair")

    assert [case.case_id for case in cases] == ["BraTS-GLI-00000-000", "BraTS2021_00006", "Brats18_2013_11_1"]
    assert cases[0].images == {"flair": tmp_path / "b23" / "BraTS-GLI-00000-000-t2f.nii.gz"}
    assert cases[1].folder == tmp_path / "b21"
    assert sorted(cases[1].images) == ["flair", "t1"]
    assert cases[2].segmentation == tmp_path / "b18" / "Brats18_2013_11_1_seg.nii.gz"


def test_find_cases_in_real_folder(brats_dir: Path) -> None:
    cases = find_brats_cases(brats_dir, "flair")

    assert len(cases) == 15
    assert cases[0].case_id == "BraTS2021_00006"
    assert sorted(cases[0].images) == ["flair", "t1", "t1ce", "t2"]
    assert all(sorted(case.images) == ["flair", "t2"] for case in cases[1:])


def test_missing_data_dir_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DatasetError, match="does not exist") as error:
        find_brats_cases(missing, "flair")
    assert str(missing) in str(error.value)


def test_file_as_data_dir_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.nii.gz"
    path.touch()

    with pytest.raises(DatasetError, match="not a folder"):
        find_brats_cases(path, "flair")


def test_empty_data_dir_lists_schemes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="No BraTS case folders") as error:
        find_brats_cases(tmp_path, "flair")

    message = str(error.value)
    assert "BraTS 2018" in message
    assert "BraTS2021_00000_flair.nii.gz" in message
    assert "BraTS-GLI-00000-000-t2f.nii.gz" in message


def test_case_folder_as_data_dir_hints_parent(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, "BraTS2021_00006", ["BraTS2021_00006_flair.nii.gz", "BraTS2021_00006_seg.nii.gz"])

    with pytest.raises(DatasetError, match="pass its parent folder"):
        find_brats_cases(case_dir, "flair")


def test_missing_modality_lists_available(tmp_path: Path) -> None:
    make_case(tmp_path, "a", ["Brats18_A_1_flair.nii.gz", "Brats18_A_1_t2.nii.gz", "Brats18_A_1_seg.nii.gz"])
    make_case(tmp_path, "b", ["Brats18_B_1_flair.nii.gz", "Brats18_B_1_t1.nii.gz", "Brats18_B_1_t2.nii.gz", "Brats18_B_1_seg.nii.gz"])

    with pytest.raises(DatasetError) as error:
        find_brats_cases(tmp_path, "t1")

    message = str(error.value)
    assert "case Brats18_A_1" in message
    assert "Brats18_A_1_t1.nii.gz" in message
    assert "found flair, seg, t2" in message
    assert "supports --modality flair, t2" in message
    assert "Every case has --modality flair, t2" in message
    assert "Brats18_B_1" not in message


def test_missing_segmentation_rejected(tmp_path: Path) -> None:
    make_case(tmp_path, "a", ["BraTS-GLI-00001-000-t2f.nii.gz"])

    with pytest.raises(DatasetError, match="has no segmentation") as error:
        find_brats_cases(tmp_path, "flair")
    assert "BraTS-GLI-00001-000-seg.nii.gz" in str(error.value)


def test_missing_modality_in_real_folder(brats_dir: Path) -> None:
    with pytest.raises(DatasetError) as error:
        find_brats_cases(brats_dir, "t1ce")

    message = str(error.value)
    assert "case Brats18_2013_11_1" in message
    assert "BraTS2021_00006" not in message
    assert "Every case has --modality flair, t2" in message


def test_unknown_modality_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'t1gd' is not a BraTS modality") as error:
        find_brats_cases(tmp_path, "t1gd")
    assert "flair, t1, t1ce, t2" in str(error.value)


def test_case_in_two_folders_rejected(tmp_path: Path) -> None:
    make_case(tmp_path, "first", ["BraTS2021_00006_flair.nii.gz", "BraTS2021_00006_seg.nii.gz"])
    make_case(tmp_path, "second", ["BraTS2021_00006_flair.nii.gz", "BraTS2021_00006_seg.nii.gz"])

    with pytest.raises(DatasetError, match="appears in two folders"):
        find_brats_cases(tmp_path, "flair")


def test_folder_with_two_cases_rejected(tmp_path: Path) -> None:
    make_case(tmp_path, "mixed", ["BraTS2021_00006_flair.nii.gz", "BraTS2021_00007_seg.nii.gz"])

    with pytest.raises(DatasetError, match="several cases") as error:
        find_brats_cases(tmp_path, "flair")
    assert "BraTS2021_00006, BraTS2021_00007" in str(error.value)


def test_duplicate_file_kind_rejected(tmp_path: Path) -> None:
    make_case(tmp_path, "a", ["BraTS2021_00006_flair.nii", "BraTS2021_00006_flair.nii.gz", "BraTS2021_00006_seg.nii.gz"])

    with pytest.raises(DatasetError, match="two flair files"):
        find_brats_cases(tmp_path, "flair")


def test_default_settings_valid() -> None:
    settings = BratsSettings()

    settings.validate()
    assert settings.as_dict() == {
        "modality": "flair",
        "image_size": 64,
        "lower_percentile": 0.5,
        "upper_percentile": 99.5,
        "min_brain_fraction": 0.0,
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"modality": "dwi"}, "'dwi'"),
        ({"image_size": 8}, "is 8,"),
        ({"image_size": 72}, "is 72,"),
        ({"image_size": 64.0}, "is 64.0,"),
        ({"image_size": True}, "is True,"),
        ({"lower_percentile": 99.5, "upper_percentile": 0.5}, "lower_percentile=99.5"),
        ({"upper_percentile": 101}, "upper_percentile=101"),
        ({"lower_percentile": float("nan")}, "lower_percentile=nan"),
        ({"min_brain_fraction": 1.0}, "got 1.0"),
        ({"min_brain_fraction": -0.1}, "got -0.1"),
    ],
)
def test_invalid_settings_rejected(changes: dict, expected: str) -> None:
    settings = BratsSettings(**changes)

    with pytest.raises(DatasetError) as error:
        settings.validate()
    assert expected in str(error.value)
