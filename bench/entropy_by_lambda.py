"""Estimated entropy of the validation latents against the entropy weight λ, on real BraTS slices.

Trains the AE at d = 16 with the unit-noise latent channel for every λ (``latent_noise``, so
λ = 0 differs from λ > 0 only in the penalty), then fits a factorized density to the
noise-free validation latents and reports their entropy in bits per image.

    .venv/bin/python bench/entropy_by_lambda.py --data-dir ../shared/data/brats
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aeplat.data import BratsSettings, load_brats
from aeplat.trainers import Trainer, TrainingConfig, estimate_entropy_bits

CASES = ("BraTS2021_00006", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1")


def load_slices(data_dir: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the normal slices of the first two cases (train) and every slice of the third (validation)."""
    with tempfile.TemporaryDirectory(prefix="aeplat-entropy-") as folder:
        for case in CASES:
            (Path(folder) / case).symlink_to((data_dir / case).resolve(), target_is_directory=True)
        slices = load_brats(Path(folder), BratsSettings(modality="flair", image_size=image_size))

    is_validation = slices.patient_ids == slices.patient_ids[-1]
    return slices.images[~is_validation & (slices.labels == 0)], slices.images[is_validation]


def entropy_bits(entropy_weight: float, train: np.ndarray, validation: np.ndarray, image_size: int, epochs: int) -> float:
    config = TrainingConfig(
        latent_dim=16, hidden_dim=256, batch_size=16, lr=2e-3, entropy_weight=entropy_weight, latent_noise=True, seed=0
    )
    trainer = Trainer(config, image_size=image_size, device=torch.device("cpu"))
    for _ in range(epochs):
        trainer.train_epoch(train)
    return estimate_entropy_bits(trainer.latents(validation), steps=300, noise_draws=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of the BraTS cases")
    parser.add_argument("--image-size", type=int, default=32, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per λ (default: %(default)s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1e-4, 1e-2, 0.1, 1.0, 3.0], help="values of λ")
    args = parser.parse_args()

    train, validation = load_slices(args.data_dir, args.image_size)
    print(f"train {len(train)} normal slices, validation {len(validation)} slices, {args.image_size}×{args.image_size}")
    print("| λ | validation latent entropy (bits per image) | seconds |")
    print("| ---: | ---: | ---: |")
    for weight in args.weights:
        started = time.monotonic()
        bits = entropy_bits(weight, train, validation, args.image_size, args.epochs)
        print(f"| {weight:g} | {bits:.1f} | {time.monotonic() - started:.0f} |")


if __name__ == "__main__":
    main()
