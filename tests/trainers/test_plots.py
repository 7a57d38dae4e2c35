"""The PNG figures of a trial and of a search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aeplat.trainers import Trainer, TrainingConfig
from aeplat.trainers.plots import plot_auc_by_latent_size, write_validation_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_validation_plots_written(tmp_path: Path, blob_images, abnormal_images) -> None:
    trainer = Trainer(TrainingConfig(latent_dim=4, hidden_dim=32, batch_size=16), image_size=32, device=torch.device("cpu"))
    images = np.concatenate([blob_images(10, 32, 0), abnormal_images(6, 32, 1)])
    labels = np.array([0] * 10 + [1] * 6)

    paths = write_validation_plots(trainer, images, labels, tmp_path)

    assert [path.name for path in paths] == ["reconstructions.png", "roc_curve.png", "score_histograms.png"]
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in paths)


def test_auc_by_latent_size_written(tmp_path: Path) -> None:
    path = plot_auc_by_latent_size(
        np.array([1, 16, 128, 16]), np.array([0.7, 0.8, 0.75, 0.82]), np.array([0.0, 0.1, 0.0, 1.0]), tmp_path / "auc.png"
    )

    assert path.read_bytes().startswith(PNG_SIGNATURE)
