"""The vae, memae and ceae models: shapes, extra losses, eval-mode paths and export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aeplat.trainers import ErrorMapModel, Trainer, TrainingConfig
from aeplat.trainers.models import (
    MODEL_BUILDERS,
    ContextEncodingAutoencoder,
    MemoryAutoencoder,
    VariationalAutoencoder,
    build_model,
)

CPU = torch.device("cpu")
SIZE = 32
VARIANTS = ("vae", "memae", "ceae")


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((count, 1, SIZE, SIZE), dtype=np.float32))


def test_every_model_registered() -> None:
    assert set(MODEL_BUILDERS) == {"ae", "vae", "memae", "ceae"}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_output_shapes(name: str) -> None:
    model = build_model(TrainingConfig(model=name, latent_dim=8, hidden_dim=64), SIZE)

    output = model.train()(images())

    assert output.reconstruction.shape == (4, 1, SIZE, SIZE)
    assert output.latent.shape == (4, 8)
    assert model.encode(images()).shape == (4, 8)


@pytest.mark.parametrize(("name", "loss_name"), [("vae", "kl"), ("memae", "memory_entropy")])
def test_extra_loss_only_in_training(name: str, loss_name: str) -> None:
    model = build_model(TrainingConfig(model=name, latent_dim=8, hidden_dim=64), SIZE)

    training_output = model.train()(images())
    eval_output = model.eval()(images())

    assert set(training_output.extra_losses) == {loss_name}
    assert training_output.extra_losses[loss_name].ndim == 0
    assert eval_output.extra_losses == {}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_eval_is_deterministic(name: str) -> None:
    model = build_model(TrainingConfig(model=name, latent_dim=8, hidden_dim=64), SIZE).eval()

    first = model(images(), generator=torch.Generator().manual_seed(1)).reconstruction
    second = model(images(), generator=torch.Generator().manual_seed(2)).reconstruction

    assert torch.equal(first, second)


def test_vae_eval_decodes_mean() -> None:
    model = VariationalAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32).eval()
    x = images()

    mean, _ = model.posterior(x)

    assert torch.equal(model(x).reconstruction, model.decode(mean))
    assert torch.equal(model(x).latent, mean)


def test_vae_kl_matches_formula() -> None:
    model = VariationalAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32, kl_weight=0.5).train()
    x = images()

    mean, log_variance = model.posterior(x)
    output = model(x)

    per_image = [
        sum(0.5 * (m**2 + math.exp(v) - 1 - v) for m, v in zip(mean[i].tolist(), log_variance[i].tolist())) for i in range(4)
    ]
    assert output.extra_losses["kl"].item() == pytest.approx(0.5 * np.mean(per_image), rel=1e-4)


def test_vae_training_samples_with_generator() -> None:
    model = VariationalAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32).train()
    x = images()

    first = model(x, generator=torch.Generator().manual_seed(1)).latent
    repeated = model(x, generator=torch.Generator().manual_seed(1)).latent
    other = model(x, generator=torch.Generator().manual_seed(2)).latent

    assert torch.equal(first, repeated)
    assert not torch.equal(first, other)


def test_memory_weights_are_shrunk_and_normalised() -> None:
    # A threshold below 1 / memory_size always keeps the largest weight.
    model = MemoryAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32, memory_size=10, shrink_threshold=0.08)
    query = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 5

    readout, weights = model.address(query)

    assert torch.allclose(weights.sum(dim=1), torch.ones(6))
    assert torch.all((weights == 0) | (weights >= 0.08 - 1e-6))
    assert torch.count_nonzero(weights == 0) > 0
    assert torch.allclose(readout, weights @ model.memory)


def test_memory_readout_reaches_decoder() -> None:
    model = MemoryAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32).eval()
    x = images()

    output = model(x)

    assert torch.equal(output.latent, model.address(model.encoder(x))[0])
    assert torch.equal(output.reconstruction, model.decode(output.latent))


def test_context_encoder_erases_one_patch() -> None:
    model = ContextEncodingAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32)
    x = torch.ones(5, 1, SIZE, SIZE)

    erased = model.erase_patches(x, torch.Generator().manual_seed(0))

    side = round(0.15625 * SIZE)
    assert model.erase_pixels == side == 5
    assert torch.all((erased == 0).sum(dim=(1, 2, 3)) == side * side)


def test_context_encoder_eval_keeps_input() -> None:
    model = ContextEncodingAutoencoder(image_size=SIZE, latent_dim=4, hidden_dim=32).eval()
    x = images()

    assert torch.equal(model(x).reconstruction, model.decode(model.encode(x)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kl_weight", -1.0, "kl_weight must be finite and >= 0, got -1.0"),
        ("memory_size", 0, "memory_size must be >= 1, got 0"),
        ("shrink_threshold", 1.0, "shrink_threshold must be in [0, 1), got 1.0"),
        ("memory_entropy_weight", math.nan, "memory_entropy_weight must be finite and >= 0, got nan"),
        ("erase_size", 0.0, "erase_size must be in (0, 1], got 0.0"),
    ],
)
def test_variant_settings_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainingConfig(**{field: value})


def test_from_mapping_still_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="unknown training configuration keys: memory_items"):
        TrainingConfig.from_mapping({"model": "memae", "memory_items": 10})


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("entropy_weight", [0.0, 1.0])
def test_trainer_trains_variant(name: str, entropy_weight: float) -> None:
    config = TrainingConfig(model=name, latent_dim=4, hidden_dim=32, batch_size=8, entropy_weight=entropy_weight)
    x = images(24).numpy()

    first = Trainer(config, image_size=SIZE, device=CPU).train_epoch(x)
    repeated = Trainer(config, image_size=SIZE, device=CPU).train_epoch(x)

    assert first == repeated
    assert math.isfinite(first["train_loss"])
    extra = sum(value for key, value in first.items() if key.endswith("_loss") and key not in ("train_loss", "train_reconstruction_loss"))
    penalty = entropy_weight * first["train_rate_bits"] / SIZE**2
    assert first["train_loss"] == pytest.approx(first["train_reconstruction_loss"] + extra + penalty, rel=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_error_map_model_exports(name: str) -> None:
    model = build_model(TrainingConfig(model=name, latent_dim=4, hidden_dim=32), SIZE).eval()
    error_map_model = ErrorMapModel(model)
    batch = torch.export.Dim("batch", min=2)

    exported = torch.export.export(error_map_model, (images(2),), dynamic_shapes=({0: batch},))

    x = images(3, seed=5)
    assert torch.allclose(exported.module()(x), error_map_model(x), atol=1e-6)
