"""Framework-free training of autoencoders for unsupervised anomaly detection.

Nothing here imports Ray or MLflow: the platform wraps ``Trainer`` in its trials.
Anomaly scores are mean squared reconstruction errors, and higher means more abnormal.
"""

from aeplat.trainers.config import TrainingConfig
from aeplat.trainers.entropy import (
    FactorizedEntropyModel,
    add_uniform_noise,
    estimate_entropy_bits,
    fit_entropy_model,
)
from aeplat.trainers.loop import Trainer, TrainingDivergedError, resolve_device, seed_everything
from aeplat.trainers.metrics import (
    BinnedPixelMetrics,
    NonFiniteScoreError,
    UndefinedMetricError,
    check_both_classes,
    image_metrics,
)
from aeplat.trainers.models import (
    MODEL_BUILDERS,
    AutoencoderOutput,
    ContextEncodingAutoencoder,
    ConvAutoencoder,
    MemoryAutoencoder,
    VariationalAutoencoder,
    build_model,
)
from aeplat.trainers.pixel import pixel_histograms, pixel_metrics
from aeplat.trainers.scoring import ErrorMapModel, image_scores, reconstruction_error_map

__all__ = [
    "MODEL_BUILDERS",
    "AutoencoderOutput",
    "BinnedPixelMetrics",
    "ContextEncodingAutoencoder",
    "ConvAutoencoder",
    "ErrorMapModel",
    "FactorizedEntropyModel",
    "MemoryAutoencoder",
    "NonFiniteScoreError",
    "Trainer",
    "TrainingConfig",
    "TrainingDivergedError",
    "UndefinedMetricError",
    "VariationalAutoencoder",
    "add_uniform_noise",
    "build_model",
    "check_both_classes",
    "estimate_entropy_bits",
    "fit_entropy_model",
    "image_metrics",
    "image_scores",
    "pixel_histograms",
    "pixel_metrics",
    "reconstruction_error_map",
    "resolve_device",
    "seed_everything",
]
