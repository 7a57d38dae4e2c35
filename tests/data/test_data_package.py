"""The data package stays free of the search frameworks, so workers can import it cheaply."""

from __future__ import annotations

import subprocess
import sys


def test_data_package_imports_no_framework() -> None:
    code = "import sys, aeplat.data; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna'}))"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)

    assert result.stdout.strip() == "[]"
