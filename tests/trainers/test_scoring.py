from __future__ import annotations

import numpy as np
import pytest
import torch

from aeplat.trainers.loop import Trainer, TrainingConfig
from aeplat.trainers.scoring import ErrorMapModel, image_scores

IMAGE_SIZE = 32


@pytest.fixture
def trained(blob_images) -> tuple[Trainer, np.ndarray]:
    images = blob_images(64, IMAGE_SIZE, 0)
    config = TrainingConfig(latent_dim=8, hidden_dim=128, batch_size=32, entropy_weight=1e-2)
    trainer = Trainer(config, image_size=IMAGE_SIZE, device=torch.device("cpu"))
    trainer.train_epoch(images)
    return trainer, images


def test_error_map_shape_and_sign(trained) -> None:
    trainer, images = trained
    model = ErrorMapModel(trainer.model)

    with torch.no_grad():
        error_maps = model(torch.from_numpy(images[:5]))

    assert error_maps.shape == (5, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert (error_maps >= 0).all()


def test_error_map_mean_equals_trainer_score(trained) -> None:
    trainer, images = trained
    model = ErrorMapModel(trainer.model)

    with torch.no_grad():
        scores = image_scores(model(torch.from_numpy(images))).numpy()

    assert scores.shape == (64,)
    assert np.allclose(scores, trainer.score(images), rtol=1e-6, atol=0)


def test_error_map_model_stays_in_eval_mode(trained) -> None:
    trainer, _ = trained
    model = ErrorMapModel(trainer.model)

    model.train()

    assert not model.training
    assert not any(module.training for module in model.modules())


def test_error_map_model_is_a_frozen_copy(trained) -> None:
    trainer, images = trained
    model = ErrorMapModel(trainer.model)
    batch = torch.from_numpy(images[:4])
    with torch.no_grad():
        before = model(batch)

    trainer.train_epoch(images)
    with torch.no_grad():
        after = model(batch)

    assert torch.equal(before, after)
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_error_map_model_exports(trained) -> None:
    trainer, images = trained
    model = ErrorMapModel(trainer.model)
    example = torch.from_numpy(images[:2])

    exported = torch.export.export(model, (example,))

    with torch.no_grad():
        expected = model(example)
    assert torch.allclose(exported.module()(example), expected, rtol=1e-5, atol=1e-7)


def test_error_map_model_exports_dynamic_batch(trained) -> None:
    trainer, images = trained
    model = ErrorMapModel(trainer.model)
    batch = torch.export.Dim("batch", min=1)

    exported = torch.export.export(model, (torch.from_numpy(images[:2]),), dynamic_shapes=({0: batch},))

    larger = torch.from_numpy(images[:7])
    with torch.no_grad():
        expected = model(larger)
    assert torch.allclose(exported.module()(larger), expected, rtol=1e-5, atol=1e-7)


def test_image_scores_is_map_mean() -> None:
    error_maps = torch.rand(3, 2, 4, 4)

    scores = image_scores(error_maps)

    assert scores.shape == (3,)
    assert torch.allclose(scores, error_maps.flatten(1).mean(dim=1))
