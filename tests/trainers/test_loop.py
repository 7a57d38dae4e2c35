from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from aeplat.trainers.entropy import FactorizedEntropyModel
from aeplat.trainers.loop import (
    Trainer,
    TrainingConfig,
    TrainingDivergedError,
    resolve_device,
    seed_everything,
)
from aeplat.trainers.metrics import NonFiniteScoreError, UndefinedMetricError

CPU = torch.device("cpu")
IMAGE_SIZE = 32
SMALL = {"latent_dim": 8, "hidden_dim": 128, "batch_size": 32}


def small_trainer(**overrides: object) -> Trainer:
    config = TrainingConfig(**{**SMALL, **overrides})
    return Trainer(config, image_size=IMAGE_SIZE, device=CPU)


def save_and_load(state: dict) -> dict:
    """Round-trip a state through torch.save and the restricted torch.load, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- TrainingConfig ---------------------------------------------------------------------


def test_config_defaults() -> None:
    config = TrainingConfig()

    assert config.model == "ae"
    assert config.latent_dim == 16
    assert config.hidden_dim == 1024
    assert config.entropy_weight == 0.0
    assert config.lr == 1e-3
    assert config.batch_size == 64
    assert config.seed == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "gan", "unknown model 'gan'. Supported models: ae"),
        ("latent_dim", 0, "latent_dim must be >= 1, got 0"),
        ("latent_dim", 16.5, "latent_dim must be an integer, got 16.5"),
        ("latent_dim", True, "latent_dim must be an integer, got True"),
        ("hidden_dim", -4, "hidden_dim must be >= 1, got -4"),
        ("entropy_weight", -1e-3, "entropy_weight must be finite and >= 0, got -0.001"),
        ("entropy_weight", math.nan, "entropy_weight must be finite and >= 0, got nan"),
        ("entropy_weight", math.inf, "entropy_weight must be finite and >= 0, got inf"),
        ("lr", 0.0, "lr must be finite and > 0, got 0.0"),
        ("lr", "0.1", "lr must be a number, got '0.1'"),
        ("batch_size", 1, "batch_size must be >= 2, got 1"),
        ("seed", -1, r"seed must be in \[0, 4294967295\], got -1"),
        ("seed", 2**32, r"seed must be in \[0, 4294967295\], got 4294967296"),
    ],
)
def test_config_invalid_value_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**{field: value})


def test_config_from_mapping_converts_types() -> None:
    values = {"latent_dim": np.int64(32), "batch_size": 16.0, "entropy_weight": np.float32(0.5), "lr": 1}

    config = TrainingConfig.from_mapping(values)

    assert config == TrainingConfig(latent_dim=32, batch_size=16, entropy_weight=0.5, lr=1.0)
    assert type(config.latent_dim) is int
    assert type(config.batch_size) is int
    assert type(config.entropy_weight) is float
    assert type(config.lr) is float


def test_config_from_mapping_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown training configuration keys: epochs, latent_size"):
        TrainingConfig.from_mapping({"latent_dim": 4, "latent_size": 4, "epochs": 10})


def test_config_from_mapping_rejects_fractional_integer() -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer, got 16.5"):
        TrainingConfig.from_mapping({"batch_size": 16.5})


def test_config_from_mapping_validates() -> None:
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        TrainingConfig.from_mapping({"lr": -1.0})


# --- training ---------------------------------------------------------------------------


def test_loss_decreases(blob_images) -> None:
    images = blob_images(128, IMAGE_SIZE, 0)
    trainer = small_trainer()

    losses = [trainer.train_epoch(images)["train_loss"] for _ in range(5)]

    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.epoch == 5


def test_plain_autoencoder_has_no_entropy_model(blob_images) -> None:
    trainer = small_trainer(entropy_weight=0.0)

    metrics = trainer.train_epoch(blob_images(64, IMAGE_SIZE, 0))

    assert trainer.entropy_model is None
    assert metrics["train_rate_bits"] == 0.0
    assert metrics["train_loss"] == metrics["train_reconstruction_loss"]


def test_entropy_penalty_trains_entropy_model(blob_images) -> None:
    trainer = small_trainer(entropy_weight=1e-3)
    initial = [parameter.detach().clone() for parameter in trainer.entropy_model.parameters()]

    metrics = trainer.train_epoch(blob_images(64, IMAGE_SIZE, 0))

    assert isinstance(trainer.entropy_model, FactorizedEntropyModel)
    assert metrics["train_rate_bits"] > 0.0
    assert metrics["train_loss"] > metrics["train_reconstruction_loss"]
    for before, parameter in zip(initial, trainer.entropy_model.parameters()):
        assert parameter.grad is not None
        assert parameter.grad.abs().sum() > 0
        assert not torch.equal(before, parameter.detach())


def test_loss_combines_terms_per_pixel(blob_images) -> None:
    entropy_weight = 0.5
    trainer = small_trainer(entropy_weight=entropy_weight, batch_size=64)

    metrics = trainer.train_epoch(blob_images(64, IMAGE_SIZE, 0))

    # One batch, so the means are those of the single step.
    expected = metrics["train_reconstruction_loss"] + entropy_weight * metrics["train_rate_bits"] / IMAGE_SIZE**2
    assert metrics["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_nan_input_raises_diverged(blob_images) -> None:
    images = blob_images(64, IMAGE_SIZE, 0)
    images[5, 0, 3, 3] = np.nan
    trainer = small_trainer()

    with pytest.raises(TrainingDivergedError, match="training loss is nan in epoch 1"):
        trainer.train_epoch(images)


def test_nan_input_raises_diverged_with_entropy(blob_images) -> None:
    images = blob_images(64, IMAGE_SIZE, 0)
    images[:] = np.nan
    trainer = small_trainer(entropy_weight=1e-2)

    with pytest.raises(TrainingDivergedError, match="entropy_weight \\(now 0.01\\)"):
        trainer.train_epoch(images)


@pytest.mark.parametrize(("num_images", "expected_steps"), [(65, 2), (64 + 32 + 1, 3), (66, 3)])
def test_last_batch_of_one_skipped(blob_images, num_images: int, expected_steps: int) -> None:
    trainer = small_trainer(batch_size=32)

    trainer.train_epoch(blob_images(num_images, IMAGE_SIZE, 0))

    first_parameter = next(trainer.model.parameters())
    assert int(trainer.optimizer.state[first_parameter]["step"]) == expected_steps


def test_wrong_image_shape_rejected(blob_images) -> None:
    trainer = small_trainer()

    with pytest.raises(ValueError, match=r"shape \(N, 1, 32, 32\), got \(4, 1, 64, 64\)"):
        trainer.train_epoch(blob_images(4, 64, 0))


@pytest.mark.parametrize("entropy_weight", [0.0, 1e-2])
def test_same_seed_identical_results(blob_images, entropy_weight: float) -> None:
    images = blob_images(96, IMAGE_SIZE, 0)
    runs = []
    for _ in range(2):
        trainer = small_trainer(entropy_weight=entropy_weight, seed=7)
        history = [trainer.train_epoch(images) for _ in range(2)]
        runs.append((history, trainer.score(images)))

    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])


def test_different_seed_different_results(blob_images) -> None:
    images = blob_images(64, IMAGE_SIZE, 0)

    first = small_trainer(seed=1).train_epoch(images)
    second = small_trainer(seed=2).train_epoch(images)

    assert first != second


def test_trainer_leaves_global_random_state(blob_images) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    small_trainer(entropy_weight=1e-2).train_epoch(blob_images(64, IMAGE_SIZE, 0))

    assert torch.equal(torch.rand(3), expected)


# --- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("entropy_weight", [0.0, 1e-2])
def test_state_round_trip_resumes_identically(blob_images, entropy_weight: float) -> None:
    images = blob_images(96, IMAGE_SIZE, 0)

    uninterrupted = small_trainer(entropy_weight=entropy_weight)
    expected = [uninterrupted.train_epoch(images) for _ in range(3)]

    interrupted = small_trainer(entropy_weight=entropy_weight)
    resumed_history = [interrupted.train_epoch(images) for _ in range(2)]
    checkpoint = save_and_load(interrupted.state_dict())
    resumed = small_trainer(entropy_weight=entropy_weight)
    resumed.load_state_dict(checkpoint)
    resumed_history.append(resumed.train_epoch(images))

    assert resumed.epoch == 3
    assert resumed_history == expected
    assert np.array_equal(resumed.score(images), uninterrupted.score(images))


def test_state_dict_is_a_copy(blob_images) -> None:
    images = blob_images(64, IMAGE_SIZE, 0)
    trainer = small_trainer()
    state = trainer.state_dict()
    saved_weights = {name: tensor.clone() for name, tensor in state["model"].items()}

    trainer.train_epoch(images)

    assert all(torch.equal(state["model"][name], saved_weights[name]) for name in saved_weights)
    assert state["epoch"] == 0


def test_load_uses_new_learning_rate(blob_images) -> None:
    trainer = small_trainer(lr=1e-3)
    trainer.train_epoch(blob_images(64, IMAGE_SIZE, 0))

    restored = small_trainer(lr=5e-4)
    restored.load_state_dict(trainer.state_dict())

    assert [group["lr"] for group in restored.optimizer.param_groups] == [5e-4]


def test_load_rejects_other_architecture() -> None:
    state = small_trainer(latent_dim=8).state_dict()

    with pytest.raises(ValueError, match="latent_dim: saved 8, now 4"):
        small_trainer(latent_dim=4).load_state_dict(state)


def test_load_rejects_entropy_model_mismatch() -> None:
    state = small_trainer(entropy_weight=0.0).state_dict()

    with pytest.raises(ValueError, match="both must have one or neither"):
        small_trainer(entropy_weight=0.1).load_state_dict(state)


def test_latent_noise_at_zero_weight_trains_entropy_model(blob_images) -> None:
    trainer = small_trainer(entropy_weight=0.0, latent_noise=True)

    metrics = trainer.train_epoch(blob_images(64, IMAGE_SIZE, 0))

    assert trainer.entropy_model is not None
    assert metrics["train_rate_bits"] > 0
    assert metrics["train_loss"] < metrics["train_reconstruction_loss"] + 1e-6


# --- scoring ----------------------------------------------------------------------------


def test_score_shape_and_dtype(blob_images) -> None:
    images = blob_images(40, IMAGE_SIZE, 0)
    trainer = small_trainer()
    trainer.train_epoch(images)

    scores = trainer.score(images)

    assert scores.shape == (40,)
    assert scores.dtype == np.float64
    assert (scores >= 0).all()
    assert np.allclose(trainer.score(images, batch_size=7), scores, rtol=1e-5, atol=0)


def test_score_is_per_image_mse(blob_images) -> None:
    images = blob_images(8, IMAGE_SIZE, 0)
    trainer = small_trainer()
    trainer.model.eval()

    with torch.no_grad():
        reconstruction = trainer.model(torch.from_numpy(images)).reconstruction.numpy()
    expected = ((reconstruction - images) ** 2).mean(axis=(1, 2, 3))

    assert np.allclose(trainer.score(images), expected, rtol=1e-5)


def test_evaluate_separates_abnormal(blob_images, abnormal_images) -> None:
    trainer = small_trainer(batch_size=16)
    for _ in range(6):
        trainer.train_epoch(blob_images(128, IMAGE_SIZE, 0))
    images = np.concatenate([blob_images(20, IMAGE_SIZE, 1), abnormal_images(20, IMAGE_SIZE, 2)])
    labels = np.array([0] * 20 + [1] * 20, dtype=np.int64)

    metrics = trainer.evaluate(images, labels)

    scores = trainer.score(images)
    assert set(metrics) == {"val_auc", "val_ap", "val_score_normal", "val_score_abnormal"}
    assert metrics["val_score_normal"] == pytest.approx(scores[:20].mean())
    assert metrics["val_score_abnormal"] == pytest.approx(scores[20:].mean())
    assert metrics["val_auc"] > 0.9
    assert 0.0 <= metrics["val_ap"] <= 1.0


def test_evaluate_one_class_rejected(blob_images) -> None:
    trainer = small_trainer()

    with pytest.raises(UndefinedMetricError, match="validation split has 6 normal and 0 abnormal"):
        trainer.evaluate(blob_images(6, IMAGE_SIZE, 0), np.zeros(6, dtype=np.int64))


def test_evaluate_nan_scores_rejected(blob_images) -> None:
    trainer = small_trainer()
    with torch.no_grad():
        trainer.model.decoder_body[-2].bias.fill_(math.nan)

    with pytest.raises(NonFiniteScoreError, match="6 of 6 anomaly scores"):
        trainer.evaluate(blob_images(6, IMAGE_SIZE, 0), np.array([0, 1, 0, 1, 0, 1]))


def test_latents_shape(blob_images) -> None:
    trainer = small_trainer(latent_dim=5)

    latents = trainer.latents(blob_images(10, IMAGE_SIZE, 0), batch_size=4)

    assert latents.shape == (10, 5)
    assert latents.device.type == "cpu"
    assert not latents.requires_grad


# --- devices and seeds ------------------------------------------------------------------


def test_seed_everything_repeats_draws() -> None:
    seed_everything(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(11)
    second = (random.random(), np.random.rand(), torch.rand(1).item())

    assert first == second


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_seed_everything_rejects_invalid(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be an integer"):
        seed_everything(seed)


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto


def test_resolve_device_invalid_name() -> None:
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(ValueError, match="CUDA is not available.*Use 'cpu' or 'auto'"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_matches_cpu(blob_images) -> None:
    images = blob_images(64, IMAGE_SIZE, 0)
    cpu_trainer = small_trainer(entropy_weight=1e-2)
    cuda_trainer = Trainer(TrainingConfig(**SMALL, entropy_weight=1e-2), IMAGE_SIZE, resolve_device("cuda"))

    cpu_metrics = cpu_trainer.train_epoch(images)
    cuda_metrics = cuda_trainer.train_epoch(images)

    assert cuda_metrics["train_loss"] == pytest.approx(cpu_metrics["train_loss"], rel=1e-2)
    assert np.allclose(cuda_trainer.score(images), cpu_trainer.score(images), rtol=1e-2, atol=1e-4)
