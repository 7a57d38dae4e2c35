"""One real search shared by every test module that reads what a search writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_support import CASES, TRIALS, run_search_command


@pytest.fixture(scope="session")
def brats_subset(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three real BraTS cases linked into a fresh folder, and a cache shared by the searches on them."""
    work = tmp_path_factory.mktemp("brats-subset")
    data_dir = work / "brats"
    data_dir.mkdir()
    for case in CASES:
        (data_dir / case).symlink_to(brats_dir / case, target_is_directory=True)
    return {"data_dir": data_dir, "cache_dir": work / "cache"}


@pytest.fixture(scope="session")
def search_run(brats_subset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run one tiny search on three real cases and return where it wrote. Tests only read it."""
    work = tmp_path_factory.mktemp("search")

    completed = run_search_command(work, brats_subset, "--trials", str(TRIALS))

    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"work": work, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "output": completed.stderr}
