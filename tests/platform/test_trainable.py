"""Checkpoint staging folders of ended trial processes are cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from aeplat.platform.trainable import CHECKPOINT_STAGING_PREFIX, remove_orphaned_staging_folders  # noqa: E402


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_folders_of_ended_processes_are_removed(tmp_path: Path) -> None:
    ended = tmp_path / f"{CHECKPOINT_STAGING_PREFIX}{_ended_pid()}-abc123"
    running = tmp_path / f"{CHECKPOINT_STAGING_PREFIX}{os.getpid()}-def456"
    unrelated = tmp_path / "other-folder"
    for folder in (ended, running, unrelated):
        folder.mkdir()
        (folder / "trainer.pt").write_bytes(b"state")

    removed = remove_orphaned_staging_folders(tmp_path)

    assert removed == 1
    assert not ended.exists()
    assert running.exists()
    assert unrelated.exists()
