"""`aeplat search` as a user runs it, on a few real BraTS cases, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = ("BraTS2021_00006", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1")
TRIALS = 3


def search_command(subset: dict, work: Path, *extra: str) -> list[str]:
    """Return the command of a tiny search (32-pixel images, 3 epochs) with its SQLite store and storage in `work`.

    Options in extra come last, so they override the defaults here.
    """
    return [
        sys.executable, "-m", "aeplat.platform.cli", "search",
        "--dataset", "brats", "--data-dir", str(subset["data_dir"]), "--modality", "flair",
        "--image-size", "32", "--epochs", "3", "--grace-period", "1", "--max-concurrent", "2",
        "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
        "--cache-dir", str(subset["cache_dir"]), "--storage", str(work / "runs"),
        *extra,
    ]  # fmt: skip


def run_search_command(work: Path, subset: dict, *extra: str) -> subprocess.CompletedProcess:
    """Run the tiny search of search_command in `work`."""
    command = search_command(subset, work, *extra)
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ})
