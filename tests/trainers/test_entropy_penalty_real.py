"""The entropy penalty on real BraTS slices: λ > 0 must leave less information in the latent."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aeplat.data import BratsSettings, load_brats
from aeplat.trainers import Trainer, TrainingConfig, estimate_entropy_bits

CASES = ("BraTS2021_00006", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1")
IMAGE_SIZE = 32
EPOCHS = 15


@pytest.fixture(scope="module")
def brats_slices(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """Normal slices of two real cases to train on (145) and all slices of a third to validate on (138), at 32×32."""
    data_dir = tmp_path_factory.mktemp("brats-entropy")
    for case in CASES:
        if not (brats_dir / case).is_dir():
            pytest.skip(f"BraTS case {case} is absent from {brats_dir}")
        (data_dir / case).symlink_to(brats_dir / case, target_is_directory=True)

    slices = load_brats(data_dir, BratsSettings(modality="flair", image_size=IMAGE_SIZE))
    is_validation = slices.patient_ids == slices.patient_ids[-1]
    train = slices.images[~is_validation & (slices.labels == 0)]
    return train, slices.images[is_validation]


def validation_entropy_bits(entropy_weight: float, train: np.ndarray, validation: np.ndarray) -> float:
    config = TrainingConfig(
        latent_dim=16, hidden_dim=256, batch_size=16, lr=2e-3, entropy_weight=entropy_weight, latent_noise=True, seed=0
    )
    trainer = Trainer(config, image_size=IMAGE_SIZE, device=torch.device("cpu"))
    for _ in range(EPOCHS):
        trainer.train_epoch(train)
    return estimate_entropy_bits(trainer.latents(validation), steps=300, noise_draws=4)


def test_entropy_penalty_lowers_latent_entropy(brats_slices: tuple[np.ndarray, np.ndarray]) -> None:
    """λ = 3 against λ = 0 at d = 16, both trained through the same unit-noise channel (latent_noise).

    The noise fixes the scale of the latent, so the entropy at unit bins compares the two:
    with these settings λ = 0 measured 32.1 bits and λ = 3 14.9 bits. Without it a plain autoencoder is free to shrink its latents: after 4 epochs at batch 32
    it measured 0.8 bits against 1.2 bits for λ = 1 on these slices, a comparison of scales,
    not of information.
    """
    train, validation = brats_slices
    started = time.monotonic()

    unpenalised_bits = validation_entropy_bits(0.0, train, validation)
    penalised_bits = validation_entropy_bits(3.0, train, validation)

    elapsed = time.monotonic() - started
    assert penalised_bits < 0.75 * unpenalised_bits, f"{penalised_bits:.1f} vs {unpenalised_bits:.1f} bits ({elapsed:.0f} s)"
