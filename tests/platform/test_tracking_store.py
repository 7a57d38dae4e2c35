"""Opening the MLflow tracking store before a search."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

OPEN_STORE = "import sys; from aeplat.platform.search import check_tracking_store; check_tracking_store(sys.argv[1])"


def test_searches_that_start_together_create_one_sqlite_store(tmp_path: Path) -> None:
    """The first opening of a new SQLite file creates MLflow's tables; several at once must not corrupt it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    processes = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [process.communicate(timeout=300)[1] for process in processes]

    assert [process.returncode for process in processes] == [0, 0, 0], errors
    assert MlflowClient(uri).search_experiments(max_results=5)
