"""Autoencoder networks and the registry that builds them from a training configuration.

Every model is a plain ``nn.Module`` whose forward returns an ``AutoencoderOutput``. The
anomaly score of an image is the mean squared reconstruction error over its pixels:
higher means more abnormal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from aeplat.trainers.config import TrainingConfig

# Channels after each of the four stride-2 convolutions of the encoder. The decoder uses
# them in reverse order.
ENCODER_CHANNELS = (16, 32, 64, 64)
DOWNSAMPLING_FACTOR = 2 ** len(ENCODER_CHANNELS)


@dataclass
class AutoencoderOutput:
    """Result of an autoencoder's forward pass.

    Attributes:
        reconstruction: (N, C, H, W) reconstruction of the input, in [0, 1].
        latent: (N, d) code produced by the encoder, before any noise was added.
    """

    reconstruction: Tensor
    latent: Tensor


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with a fully connected bottleneck of size ``latent_dim``.

    Encoder: four blocks of Conv2d(kernel 4, stride 2, padding 1), BatchNorm2d and ReLU with
    16, 32, 64 and 64 channels take (N, C, H, W) to (N, 64, H/16, W/16). The flattened
    features (1,024 at 64×64) go through Linear to ``hidden_dim``, BatchNorm1d, ReLU and a
    Linear to the (N, d) latent, with no activation. The decoder mirrors the encoder and
    ends in a sigmoid, because inputs lie in [0, 1].

    Used as an anomaly detector, the model is trained on normal images only, and the mean
    squared reconstruction error of an image is its anomaly score: higher means more abnormal.

    Args:
        image_size: height and width H = W of the square input, a multiple of 16 and >= 16.
        latent_dim: size d of the latent code, >= 1.
        hidden_dim: width of the fully connected layer on each side of the latent.
        in_channels: number of image channels C.
    """

    def __init__(self, image_size: int = 64, latent_dim: int = 16, hidden_dim: int = 1024, in_channels: int = 1) -> None:
        super().__init__()
        _check_sizes(image_size, latent_dim, hidden_dim, in_channels)
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.in_channels = in_channels

        self.feature_size = image_size // DOWNSAMPLING_FACTOR
        self.feature_shape = (ENCODER_CHANNELS[-1], self.feature_size, self.feature_size)
        flat_size = ENCODER_CHANNELS[-1] * self.feature_size**2

        self.encoder = nn.Sequential(
            *_downsampling_blocks(in_channels),
            nn.Flatten(),
            *_linear_block(flat_size, hidden_dim),
            nn.Linear(hidden_dim, latent_dim),
        )
        self.decoder_head = nn.Sequential(
            *_linear_block(latent_dim, hidden_dim),
            *_linear_block(hidden_dim, flat_size),
        )
        self.decoder_body = nn.Sequential(
            *_upsampling_blocks(),
            nn.ConvTranspose2d(ENCODER_CHANNELS[0], in_channels, kernel_size=4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def encode(self, x: Tensor) -> Tensor:
        """Return the (N, d) latent code of images x of shape (N, C, H, W)."""
        self._check_input(x)
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Return (N, C, H, W) reconstructions in [0, 1] from latent codes z of shape (N, d)."""
        features = self.decoder_head(z)
        features = features.unflatten(1, self.feature_shape)
        return self.decoder_body(features)

    def forward(self, x: Tensor, latent_noise: Callable[[Tensor], Tensor] | None = None) -> AutoencoderOutput:
        """Encode and decode x of shape (N, C, H, W).

        If ``latent_noise`` is given, the decoder receives ``latent_noise(z)``, while the
        output's ``latent`` is still the noise-free code z.
        """
        latent = self.encode(x)
        decoder_input = latent if latent_noise is None else latent_noise(latent)
        return AutoencoderOutput(reconstruction=self.decode(decoder_input), latent=latent)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}. "
                f"Resize the images to this shape or build a model for theirs"
            )


def _check_sizes(image_size: int, latent_dim: int, hidden_dim: int, in_channels: int) -> None:
    if image_size < DOWNSAMPLING_FACTOR or image_size % DOWNSAMPLING_FACTOR != 0:
        raise ValueError(
            f"image_size must be a multiple of {DOWNSAMPLING_FACTOR} and at least {DOWNSAMPLING_FACTOR}, "
            f"because the encoder halves it {len(ENCODER_CHANNELS)} times, got {image_size}"
        )

    if latent_dim < 1:
        raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")

    if hidden_dim < 1:
        raise ValueError(f"hidden_dim must be at least 1, got {hidden_dim}")

    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")


def _downsampling_blocks(in_channels: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for out_channels in ENCODER_CHANNELS:
        # No bias: the BatchNorm that follows removes any constant shift.
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False))
        layers.extend([nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)])
        in_channels = out_channels
    return layers


def _upsampling_blocks() -> list[nn.Module]:
    channels = ENCODER_CHANNELS[::-1]  # 64, 64, 32, 16
    layers: list[nn.Module] = []
    for in_channels, out_channels in zip(channels[:-1], channels[1:]):
        layers.append(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False))
        layers.extend([nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)])
    return layers


def _linear_block(in_features: int, out_features: int) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU(inplace=True)]


def _build_conv_autoencoder(config: TrainingConfig, image_size: int, in_channels: int) -> nn.Module:
    return ConvAutoencoder(
        image_size=image_size,
        latent_dim=config.latent_dim,
        hidden_dim=config.hidden_dim,
        in_channels=in_channels,
    )


# Builders by the name used in TrainingConfig.model. A new architecture is one entry here.
# Every model must provide encode(x), decode(z) and forward(x, latent_noise) as ConvAutoencoder does.
MODEL_BUILDERS: dict[str, Callable[[TrainingConfig, int, int], nn.Module]] = {
    "ae": _build_conv_autoencoder,
}


def build_model(config: TrainingConfig, image_size: int, in_channels: int = 1) -> nn.Module:
    """Build the untrained model named by ``config.model`` for square images of ``image_size``."""
    builder = MODEL_BUILDERS.get(config.model)
    if builder is None:
        raise ValueError(f"unknown model {config.model!r}. Supported models: {', '.join(sorted(MODEL_BUILDERS))}")

    return builder(config, image_size, in_channels)
