"""Hyperparameters of one training run, validated when the configuration is created."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Largest seed that every seeded library accepts (numpy seeds are 32-bit).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of one training run. Creating an instance runs ``validate``.

    Attributes:
        model: name of the architecture in ``aeplat.trainers.models.MODEL_BUILDERS``.
        latent_dim: size d of the latent code.
        hidden_dim: width of the fully connected layers next to the latent.
        entropy_weight: weight λ of the latent-entropy penalty, in loss per bit per pixel
            (see ``Trainer``, which gives the useful range). 0 trains a plain autoencoder.
        latent_noise: train the decoder on z + u, u ~ U(-1/2, 1/2), also when λ = 0 (λ > 0
            always adds the noise). The noise fixes the scale at which the entropy of the
            latent is measured, so with it λ = 0 and λ > 0 differ only in the penalty.
        lr: learning rate of Adam.
        batch_size: number of images per training step, at least 2 for BatchNorm.
        seed: seed of weight initialisation, shuffling and latent noise, in [0, 2**32 - 1].
        kl_weight: ``vae`` only. Weight of the KL term (summed over d, averaged over images)
            next to the per-pixel MSE. 0.005 is the default of Cai et al. (MICCAI 2024).
        memory_size: ``memae`` only. Number of memory items.
        shrink_threshold: ``memae`` only. Hard-shrinkage threshold of the memory
            addressing weights, in [0, 1). 0 turns shrinkage off.
        memory_entropy_weight: ``memae`` only. Weight of the entropy of the addressing
            weights in the loss.
        erase_size: ``ceae`` only. Side of the square patch erased from each training
            image, as a fraction of the image side in (0, 1]. The default 0.15625 erases
            10×10 pixels at 64×64.
    """

    model: str = "ae"
    latent_dim: int = 16
    hidden_dim: int = 1024
    entropy_weight: float = 0.0
    latent_noise: bool = False
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    kl_weight: float = 0.005
    memory_size: int = 25
    shrink_threshold: float = 0.0025
    memory_entropy_weight: float = 0.0002
    erase_size: float = 0.15625

    def __post_init__(self) -> None:
        self.validate()

    @property
    def uses_latent_noise(self) -> bool:
        """True if training adds uniform noise to the latent and fits an entropy model of it."""
        return self.entropy_weight > 0 or self.latent_noise

    def validate(self) -> None:
        """Raise ValueError naming the first field that breaks its rule, with its value."""
        _check_model_name(self.model)
        _check_integer("latent_dim", self.latent_dim, minimum=1)
        _check_integer("hidden_dim", self.hidden_dim, minimum=1)
        _check_integer("batch_size", self.batch_size, minimum=2)
        _check_integer("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_real("entropy_weight", self.entropy_weight, allow_zero=True)
        if not isinstance(self.latent_noise, bool):
            raise ValueError(f"latent_noise must be true or false, got {self.latent_noise!r}")
        _check_real("lr", self.lr, allow_zero=False)
        _check_real("kl_weight", self.kl_weight, allow_zero=True)
        _check_integer("memory_size", self.memory_size, minimum=1)
        _check_fraction("shrink_threshold", self.shrink_threshold, include_zero=True, include_one=False)
        _check_real("memory_entropy_weight", self.memory_entropy_weight, allow_zero=True)
        _check_fraction("erase_size", self.erase_size, include_zero=False, include_one=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """Build a configuration from the keys of ``values``. Missing keys keep their defaults.

        Integral floats and numpy scalars are converted to the field's type, as search
        libraries may produce them. Raises ValueError naming any unknown key.
        """
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown training configuration keys: {', '.join(map(str, unknown))}. "
                f"Known keys: {', '.join(known)}"
            )

        converted = {name: _convert(name, value, default=known[name].default) for name, value in values.items()}
        return cls(**converted)


def _convert(name: str, value: Any, default: Any) -> Any:
    """Convert value to the type of the field's default, or raise ValueError if it does not fit."""
    if isinstance(default, str):
        return value
    if isinstance(default, bool):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")

    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(default, int):
        if is_number and float(value).is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")

    if is_number:
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")


def _check_model_name(name: Any) -> None:
    # Imported here because models.py refers to TrainingConfig.
    from aeplat.trainers.models import MODEL_BUILDERS

    if not isinstance(name, str) or name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}. Supported models: {', '.join(sorted(MODEL_BUILDERS))}")


def _check_integer(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")

    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_real(name: str, value: Any, allow_zero: bool) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")

    positive = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and positive):
        rule = "finite and >= 0" if allow_zero else "finite and > 0"
        raise ValueError(f"{name} must be {rule}, got {value}")


def _check_fraction(name: str, value: Any, include_zero: bool, include_one: bool) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")

    above_low = value >= 0 if include_zero else value > 0
    below_high = value <= 1 if include_one else value < 1
    if not (math.isfinite(value) and above_low and below_high):
        interval = f"{'[' if include_zero else '('}0, 1{']' if include_one else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
