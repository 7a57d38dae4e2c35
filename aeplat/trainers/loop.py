"""One training loop for every autoencoder, with no framework: epochs, scoring and checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aeplat.trainers.config import MAX_SEED, TrainingConfig
from aeplat.trainers.entropy import FactorizedEntropyModel, add_uniform_noise
from aeplat.trainers.metrics import ABNORMAL, NORMAL, image_metrics
from aeplat.trainers.models import AutoencoderOutput, build_model
from aeplat.trainers.scoring import image_scores, reconstruction_error_map

__all__ = ["TrainingConfig", "TrainingDivergedError", "Trainer", "resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)

# Fields of TrainingConfig that fix the shapes of the saved parameters.
ARCHITECTURE_FIELDS = ("model", "latent_dim", "hidden_dim", "memory_size")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class Trainer:
    """Train an autoencoder on normal images, score images and save or restore its state.

    The loss of a batch is

        MSE(reconstruction, x) + sum of the model's extra losses + λ · mean rate / (C · H · W),

    where MSE is the mean over all pixels. The extra losses are the weighted terms in
    ``AutoencoderOutput.extra_losses`` (the VAE's KL term, the MemAE's addressing entropy).
    λ is ``config.entropy_weight``, and the rate is the entropy Ĥ(z̃) in bits per image of
    the latent that reaches the decoder, from a ``FactorizedEntropyModel``. Dividing
    the rate by the number of pixels gives bits per pixel, so both terms are per pixel and
    the same λ means the same trade of error per pixel for bits per pixel at any image size.

    Useful λ lie between about 1e-2 and 10. On 2,048 synthetic 32×32 blob images with
    d = 16, 30 epochs and batch 64, the final rate was 67 bits per image at λ = 1e-4, 60 at
    1e-2, 35 at 0.1, 18 at 1 and 10 at 10, where the reconstruction error was 15 times that
    of λ = 0. The latents of the plain autoencoder (λ = 0) had an estimated entropy of 54
    bits. NOTE: measured on synthetic images only, so recheck the range on real slices
    before fixing a search space.

    With λ > 0 the decoder receives z̃ = z + u with u ~ U(-1/2, 1/2) during training,
    because the rate only limits information at a fixed noise scale. With λ = 0 the model
    is a plain autoencoder, with no noise and no entropy model, unless
    ``config.latent_noise`` is set: then it trains through the same noisy channel and fits
    the same entropy model, and only the penalty is missing. That is the baseline against
    which the effect of λ is measured, because a plain autoencoder can shrink its latents
    at will, and then its entropy at unit bins measures that scale, not the information. Scoring never adds noise.

    One Adam optimiser updates the autoencoder and the entropy model. The entropy model's
    parameters also get the gradient of the unscaled rate, computed on a detached latent.
    This does not move their minimum, because the reconstruction term does not depend on
    them, and it fits the density equally fast for every λ.

    Weight initialisation, shuffling, latent noise and the models' own random draws (VAE
    sampling, CeAE patch positions) are seeded from ``config.seed``, so two
    trainers with the same configuration produce bit-identical results on the CPU with the
    same number of threads. The CUDA kernels of convolutions are not all deterministic, so
    runs on a GPU can differ slightly. NOTE: the CUDA path has not been run yet.
    test_training_on_cuda_matches_cpu checks it on a machine with a GPU.

    Args:
        config: hyperparameters of the run.
        image_size: height and width of the square training images.
        device: device that runs the model. Arrays stay on the CPU and move batch by batch.
        in_channels: number of image channels.
    """

    def __init__(self, config: TrainingConfig, image_size: int, device: torch.device, in_channels: int = 1) -> None:
        config.validate()
        self.config = config
        self.image_size = image_size
        self.in_channels = in_channels
        self.device = torch.device(device)
        self.num_pixels = in_channels * image_size * image_size
        self.epoch = 0

        # Build on the CPU from a private seeded stream, so the initial weights are the
        # same on every device and the global random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model(config, image_size, in_channels)
            entropy_model = FactorizedEntropyModel(config.latent_dim) if config.uses_latent_noise else None

        self.model = model.to(self.device)
        self.entropy_model = entropy_model.to(self.device) if entropy_model is not None else None

        parameters = list(self.model.parameters())
        if self.entropy_model is not None:
            parameters += list(self.entropy_model.parameters())
        self.optimizer = torch.optim.Adam(parameters, lr=config.lr)

        # Shuffling and latent noise come from this CPU generator, on every device.
        self.generator = torch.Generator().manual_seed(config.seed)

    def train_epoch(self, images: np.ndarray) -> dict[str, float]:
        """Train one epoch on images (N, C, H, W) in a new random order and return mean losses.

        Returns ``train_loss``, ``train_reconstruction_loss`` (MSE per pixel),
        ``train_rate_bits`` (bits per image, 0.0 when λ = 0) and ``train_<name>_loss`` for
        each extra loss of the model (``train_kl_loss``, ``train_memory_entropy_loss``),
        each averaged over images.
        A last batch of a single image is skipped, because BatchNorm cannot train on it.
        Raises TrainingDivergedError on a NaN or infinite loss, before the step that would
        apply it.
        """
        data = self._as_tensor(images)
        batches = self._shuffled_batches(data.shape[0])

        self.model.train()
        if self.entropy_model is not None:
            self.entropy_model.train()

        totals: dict[str, float] = {}
        seen = 0
        for batch_number, index in enumerate(batches):
            batch = data[index].to(self.device, non_blocking=True)
            losses = self._train_step(batch, batch_number)

            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value * len(index)
            seen += len(index)

        self.epoch += 1
        results = {name: total / seen for name, total in totals.items()}
        logger.debug("epoch %d: %s", self.epoch, results)
        return results

    def score(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Return the (N,) float64 anomaly scores of images: mean squared error per image.

        Runs in eval mode without latent noise. Higher means more abnormal.
        """
        data = self._as_tensor(images)
        self.model.eval()

        scores = []
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start : start + batch_size].to(self.device, non_blocking=True)
                error_maps = reconstruction_error_map(self.model, batch)
                scores.append(image_scores(error_maps).cpu())

        return torch.cat(scores).numpy().astype(np.float64)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Score labelled images and return ``val_auc``, ``val_ap`` and the mean score of each class.

        The class means are ``val_score_normal`` and ``val_score_abnormal``. Raises
        NonFiniteScoreError when a score is NaN or infinite, and UndefinedMetricError when
        the labels contain one class only.
        """
        metrics, _ = self.evaluate_with_scores(images, labels)
        return metrics

    def evaluate_with_scores(self, images: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        """Return the metrics of ``evaluate`` and the (N,) anomaly scores they were computed from."""
        labels = np.asarray(labels)
        scores = self.score(images)
        metrics = image_metrics(labels, scores, split_name="validation")

        summary = {
            "val_auc": metrics["auc"],
            "val_ap": metrics["ap"],
            "val_score_normal": float(scores[labels == NORMAL].mean()),
            "val_score_abnormal": float(scores[labels == ABNORMAL].mean()),
        }
        return summary, scores

    def reconstruct(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Return the float32 reconstructions (N, C, H, W) of images, computed in eval mode without noise."""
        data = self._as_tensor(images)
        self.model.eval()

        reconstructions = []
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start : start + batch_size].to(self.device, non_blocking=True)
                reconstructions.append(self.model(batch).reconstruction.cpu())

        return torch.cat(reconstructions).numpy()

    def error_maps(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Return the float32 per-pixel squared errors (N, C, H, W) of images. Higher means more abnormal.

        The mean of each map is the image's score from ``score``. The result contains N·C·H·W
        floats, so score a large set in chunks.
        """
        data = self._as_tensor(images)
        self.model.eval()

        maps = []
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start : start + batch_size].to(self.device, non_blocking=True)
                maps.append(reconstruction_error_map(self.model, batch).cpu())

        return torch.cat(maps).numpy()

    def latents(self, images: np.ndarray, batch_size: int = 256) -> Tensor:
        """Return the (N, d) noise-free latents that reach the decoder, on the CPU, computed in eval mode.

        These are the latents the entropy penalty acts on: the posterior mean μ of a VAE and
        the memory readout of a MemAE.
        """
        data = self._as_tensor(images)
        self.model.eval()

        codes = []
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                batch = data[start : start + batch_size].to(self.device, non_blocking=True)
                codes.append(self.model.encode(batch).cpu())

        return torch.cat(codes)

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of everything needed to resume training: weights, optimiser, generator, epoch.

        The result contains only tensors, numbers, strings, dicts and lists, so
        ``torch.load(..., weights_only=True)`` can read it back.
        """
        state = {
            "config": dataclasses.asdict(self.config),
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "entropy_model": None if self.entropy_model is None else self.entropy_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict`` so that training continues where it stopped.

        The saved run must have the same architecture, image size and channels, and an
        entropy model exactly when this trainer has one (λ > 0). Other settings may differ,
        as when a population-based search changes them: the learning rate of this
        trainer's configuration replaces the saved one.
        """
        self._check_compatible(state)

        self.model.load_state_dict(state["model"])
        if self.entropy_model is not None:
            self.entropy_model.load_state_dict(state["entropy_model"])

        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr

        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])

    def _train_step(self, batch: Tensor, batch_number: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)

        if self.entropy_model is None:
            output = self.model(batch, generator=self.generator)
            reconstruction_loss = F.mse_loss(output.reconstruction, batch)
            loss = reconstruction_loss + _sum_of(output.extra_losses)
            value = self._checked_value(loss, batch_number)
            loss.backward()
            self.optimizer.step()
            return {
                "train_loss": value,
                "train_reconstruction_loss": reconstruction_loss.item(),
                "train_rate_bits": 0.0,
                **_extra_loss_values(output.extra_losses),
            }

        output, noisy_latent = self._forward_with_noise(batch)
        reconstruction_loss = F.mse_loss(output.reconstruction, batch)
        rate_bits = self.entropy_model(noisy_latent).mean()
        loss = reconstruction_loss + _sum_of(output.extra_losses) + self.config.entropy_weight * rate_bits / self.num_pixels
        value = self._checked_value(loss, batch_number)

        # The rate of the detached latent trains only the entropy model, at full strength
        # for every λ (see the class docstring).
        density_fit_bits = self.entropy_model(noisy_latent.detach()).mean()
        (loss + density_fit_bits).backward()
        self.optimizer.step()

        return {
            "train_loss": value,
            "train_reconstruction_loss": reconstruction_loss.item(),
            "train_rate_bits": rate_bits.item(),
            **_extra_loss_values(output.extra_losses),
        }

    def _forward_with_noise(self, batch: Tensor) -> tuple[AutoencoderOutput, Tensor]:
        """Run the model with uniform noise on the latent; return its output and the noisy latent."""
        noisy_latents: list[Tensor] = []

        def add_noise(latent: Tensor) -> Tensor:
            noisy = add_uniform_noise(latent, self.generator)
            noisy_latents.append(noisy)
            return noisy

        output = self.model(batch, latent_noise=add_noise, generator=self.generator)
        return output, noisy_latents[0]

    def _checked_value(self, loss: Tensor, batch_number: int) -> float:
        """Return the loss as a float, or raise TrainingDivergedError if it is NaN or infinite."""
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"training loss is {value} in epoch {self.epoch + 1}, batch {batch_number + 1}. "
                f"Check the images for NaN values, or lower lr (now {self.config.lr}) "
                f"or entropy_weight (now {self.config.entropy_weight})"
            )
        return value

    def _shuffled_batches(self, num_images: int) -> list[Tensor]:
        order = torch.randperm(num_images, generator=self.generator)
        batches = list(torch.split(order, self.config.batch_size))
        if len(batches[-1]) == 1:
            batches.pop()
        return batches

    def _as_tensor(self, images: np.ndarray) -> Tensor:
        """Return images as a CPU float32 tensor, sharing memory with the array where possible."""
        array = np.ascontiguousarray(images, dtype=np.float32)
        expected = (self.in_channels, self.image_size, self.image_size)
        if array.ndim != 4 or array.shape[1:] != expected or array.shape[0] < 2:
            raise ValueError(
                f"expected at least 2 images of shape (N, {', '.join(map(str, expected))}), got {array.shape}. "
                f"Pass images of the size this trainer was built for"
            )

        # torch.from_numpy warns on read-only arrays, such as memory-mapped files.
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        differences = [
            f"{name}: saved {saved.get(name)!r}, now {getattr(self.config, name)!r}"
            for name in ARCHITECTURE_FIELDS
            if saved.get(name) != getattr(self.config, name)
        ]
        for name in ("image_size", "in_channels"):
            if state[name] != getattr(self, name):
                differences.append(f"{name}: saved {state[name]!r}, now {getattr(self, name)!r}")
        if differences:
            raise ValueError(
                f"the checkpoint was saved by a different model ({', '.join(differences)}). "
                f"Restore it into a trainer with the saved settings"
            )

        has_saved_entropy_model = state["entropy_model"] is not None
        if has_saved_entropy_model != (self.entropy_model is not None):
            raise ValueError(
                f"the checkpoint was saved with entropy_weight {saved.get('entropy_weight')} and latent_noise "
                f"{saved.get('latent_noise', False)}, and this trainer has {self.config.entropy_weight} and "
                f"{self.config.latent_noise}. Only λ > 0 or latent_noise trains an entropy model, so both "
                f"must have one or neither"
            )


def _sum_of(losses: dict[str, Tensor]) -> Tensor | float:
    return sum(losses.values(), 0.0)


def _extra_loss_values(losses: dict[str, Tensor]) -> dict[str, float]:
    return {f"train_{name}_loss": value.item() for name, value in losses.items()}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random generators (torch seeds CUDA too)."""
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``name``: "auto" picks CUDA when available, else the CPU.

    Other names are passed to ``torch.device`` ("cpu", "cuda", "cuda:1"). Raises
    ValueError for an invalid name or a CUDA device that this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r} ({error}). Use 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from None

    if device.type == "cuda":
        _check_cuda_device(device)
    return device


def _check_cuda_device(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested, but CUDA is not available (torch {torch.__version__}). "
            f"Use 'cpu' or 'auto', or install a CUDA build of torch on a machine with a GPU"
        )

    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(device)!r} was requested, but this machine has {count} CUDA device(s)")
