"""Autoencoder networks and the registry that builds them from a training configuration.

Every model is a plain ``nn.Module`` whose forward returns an ``AutoencoderOutput``. The
anomaly score of an image is the mean squared reconstruction error over its pixels:
higher means more abnormal.

Models: ``ae`` (ConvAutoencoder), ``vae`` (VariationalAutoencoder), ``memae``
(MemoryAutoencoder) and ``ceae`` (ContextEncodingAutoencoder). All four share the encoder
and decoder of ConvAutoencoder and differ in what happens between them or to the input.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
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
        latent: (N, d) code that reaches the decoder, before the latent noise of the
            entropy penalty was added.
        extra_losses: weighted loss terms that the model adds to the reconstruction loss
            while training, by name (for example ``kl`` of the VAE), each a scalar tensor.
            Empty for the plain autoencoder and in eval mode.
    """

    reconstruction: Tensor
    latent: Tensor
    extra_losses: dict[str, Tensor] = field(default_factory=dict)


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

    def forward(
        self,
        x: Tensor,
        latent_noise: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Encode and decode x of shape (N, C, H, W).

        If ``latent_noise`` is given, the decoder receives ``latent_noise(z)``, while the
        output's ``latent`` is still the noise-free code z. ``generator`` seeds the random
        draws of models that make them in training mode. This model makes none.
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


class VariationalAutoencoder(ConvAutoencoder):
    """Variational autoencoder (Kingma and Welling, ICLR 2014) with the encoder and decoder of ConvAutoencoder.

    The encoder's last Linear layer outputs 2d values: the mean μ and the log-variance
    log σ² of a Gaussian posterior over the (N, d) latent. In training mode the decoder
    receives z = μ + σ ε with ε ~ N(0, I), and the output's ``extra_losses["kl"]`` is
    ``kl_weight`` times the KL divergence from N(0, I), summed over the d dimensions and
    averaged over the batch. In eval mode the decoder receives μ, so scoring is
    deterministic: an image's score is the mean squared error of its reconstruction from
    μ, and higher means more abnormal. ``encode`` returns μ.

    Args:
        kl_weight: weight of the KL term next to the per-pixel MSE, >= 0.
        Other arguments as for ConvAutoencoder.
    """

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 16,
        hidden_dim: int = 1024,
        in_channels: int = 1,
        kl_weight: float = 0.005,
    ) -> None:
        super().__init__(image_size=image_size, latent_dim=latent_dim, hidden_dim=hidden_dim, in_channels=in_channels)
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight}")

        self.kl_weight = kl_weight
        self.encoder[-1] = nn.Linear(hidden_dim, 2 * latent_dim)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the mean μ and log-variance log σ² of the posterior of x, each of shape (N, d)."""
        self._check_input(x)
        mean, log_variance = self.encoder(x).chunk(2, dim=1)
        return mean, log_variance

    def encode(self, x: Tensor) -> Tensor:
        """Return the (N, d) posterior mean μ of images x of shape (N, C, H, W)."""
        return self.posterior(x)[0]

    def forward(
        self,
        x: Tensor,
        latent_noise: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Encode x (N, C, H, W), sample z in training mode (μ in eval mode) and decode it.

        ``generator`` draws ε. The output's ``latent`` is z, and ``latent_noise`` (the
        entropy penalty's noise) is added to z only on its way to the decoder.
        """
        mean, log_variance = self.posterior(x)
        if not self.training:
            return self._decode_latent(mean, latent_noise, extra_losses={})

        epsilon = _standard_normal_like(mean, generator)
        latent = mean + torch.exp(0.5 * log_variance) * epsilon

        kl_per_image = -0.5 * (1.0 + log_variance - mean.square() - log_variance.exp()).sum(dim=1)
        return self._decode_latent(latent, latent_noise, extra_losses={"kl": self.kl_weight * kl_per_image.mean()})

    def _decode_latent(
        self, latent: Tensor, latent_noise: Callable[[Tensor], Tensor] | None, extra_losses: dict[str, Tensor]
    ) -> AutoencoderOutput:
        decoder_input = latent if latent_noise is None else latent_noise(latent)
        return AutoencoderOutput(reconstruction=self.decode(decoder_input), latent=latent, extra_losses=extra_losses)


class MemoryAutoencoder(ConvAutoencoder):
    """Memory-augmented autoencoder (Gong et al., "Memorizing Normality to Detect Anomaly", ICCV 2019).

    A learned memory of ``memory_size`` items of size d sits between encoder and decoder.
    The encoder's (N, d) code q addresses it: the weights w = softmax(q Mᵀ) over the items
    (dot-product similarity) go through hard shrinkage,
    ŵ = relu(w - t) · w / (|w - t| + 1e-12) with t = ``shrink_threshold``, and are
    renormalised to sum to 1. The decoder receives the (N, d) readout ẑ = ŵ M, so an
    abnormal image is reconstructed from normal memory items and its error stays high:
    higher scores mean more abnormal. ``encode`` and the output's ``latent`` return ẑ, the
    latent that reaches the decoder, so the entropy penalty applies to it. In training mode
    ``extra_losses["memory_entropy"]`` is ``memory_entropy_weight`` times the mean entropy
    (in nats) of ŵ, which favours sparse addressing.

    Args:
        memory_size: number N of memory items, >= 1.
        shrink_threshold: threshold t in [0, 1). 0 turns shrinkage off. With t >= 1/N all
            weights of a code can be cut, and its readout is the zero vector.
        memory_entropy_weight: weight of the addressing-entropy term, >= 0.
        Other arguments as for ConvAutoencoder.
    """

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 16,
        hidden_dim: int = 1024,
        in_channels: int = 1,
        memory_size: int = 25,
        shrink_threshold: float = 0.0025,
        memory_entropy_weight: float = 0.0002,
    ) -> None:
        super().__init__(image_size=image_size, latent_dim=latent_dim, hidden_dim=hidden_dim, in_channels=in_channels)
        _check_memory_arguments(memory_size, shrink_threshold, memory_entropy_weight)
        self.shrink_threshold = shrink_threshold
        self.memory_entropy_weight = memory_entropy_weight

        bound = 1.0 / math.sqrt(latent_dim)
        self.memory = nn.Parameter(torch.empty(memory_size, latent_dim).uniform_(-bound, bound))

    def address(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Return the (N, d) memory readout of (N, d) queries and the (N, memory_size) addressing weights."""
        weights = torch.softmax(query @ self.memory.t(), dim=1)

        if self.shrink_threshold > 0:
            shifted = weights - self.shrink_threshold
            weights = F.relu(shifted) * weights / (shifted.abs() + 1e-12)
            weights = F.normalize(weights, p=1, dim=1)

        return weights @ self.memory, weights

    def encode(self, x: Tensor) -> Tensor:
        """Return the (N, d) memory readout ẑ of images x of shape (N, C, H, W)."""
        self._check_input(x)
        return self.address(self.encoder(x))[0]

    def forward(
        self,
        x: Tensor,
        latent_noise: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Encode x (N, C, H, W), read the memory and decode the readout. Makes no random draws."""
        self._check_input(x)
        latent, weights = self.address(self.encoder(x))
        decoder_input = latent if latent_noise is None else latent_noise(latent)
        reconstruction = self.decode(decoder_input)

        if not self.training:
            return AutoencoderOutput(reconstruction=reconstruction, latent=latent)

        entropy = -(weights * torch.log(weights + 1e-12)).sum(dim=1).mean()
        extra_losses = {"memory_entropy": self.memory_entropy_weight * entropy}
        return AutoencoderOutput(reconstruction=reconstruction, latent=latent, extra_losses=extra_losses)


class ContextEncodingAutoencoder(ConvAutoencoder):
    """Context-encoding autoencoder: trained to restore images with an erased square patch.

    In training mode every input image gets one square patch, at a uniformly random
    position inside the image, set to 0 before encoding, while the loss compares the
    reconstruction with the unerased image. In eval mode nothing is erased, so scores are
    reconstruction errors of the unerased images: higher means more abnormal.

    Args:
        erase_size: side of the patch as a fraction of the image side, in (0, 1]. The
            default 0.15625 is a 10×10 patch at 64×64 (5×5 at 32×32). The side in pixels
            is round(erase_size · image_size), at least 1.
        Other arguments as for ConvAutoencoder.
    """

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 16,
        hidden_dim: int = 1024,
        in_channels: int = 1,
        erase_size: float = 0.15625,
    ) -> None:
        super().__init__(image_size=image_size, latent_dim=latent_dim, hidden_dim=hidden_dim, in_channels=in_channels)
        if not (math.isfinite(erase_size) and 0 < erase_size <= 1):
            raise ValueError(f"erase_size must be a fraction of the image side in (0, 1], got {erase_size}")

        self.erase_pixels = max(1, round(erase_size * image_size))

    def erase_patches(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return a copy of x (N, C, H, W) with one random square patch per image set to 0."""
        count, _, height, width = x.shape
        side = self.erase_pixels
        noise_device = generator.device if generator is not None else torch.device("cpu")
        tops = torch.randint(0, height - side + 1, (count, 1), generator=generator, device=noise_device).to(x.device)
        lefts = torch.randint(0, width - side + 1, (count, 1), generator=generator, device=noise_device).to(x.device)

        rows = torch.arange(height, device=x.device).unsqueeze(0)
        columns = torch.arange(width, device=x.device).unsqueeze(0)
        in_rows = (rows >= tops) & (rows < tops + side)  # (N, H)
        in_columns = (columns >= lefts) & (columns < lefts + side)  # (N, W)
        patch = in_rows.unsqueeze(2) & in_columns.unsqueeze(1)  # (N, H, W)

        return x.masked_fill(patch.unsqueeze(1), 0.0)

    def forward(
        self,
        x: Tensor,
        latent_noise: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> AutoencoderOutput:
        """Erase a patch of each image in training mode (``generator`` places it), then encode and decode."""
        inputs = self.erase_patches(x, generator) if self.training else x
        return super().forward(inputs, latent_noise=latent_noise)


def _standard_normal_like(reference: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw N(0, 1) noise shaped like reference on the generator's device and move it to reference's."""
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(reference.shape, generator=generator, device=noise_device, dtype=reference.dtype)
    return noise.to(reference.device)


def _check_memory_arguments(memory_size: int, shrink_threshold: float, memory_entropy_weight: float) -> None:
    if memory_size < 1:
        raise ValueError(f"memory_size must be at least 1, got {memory_size}")

    if not (math.isfinite(shrink_threshold) and 0 <= shrink_threshold < 1):
        raise ValueError(f"shrink_threshold must be in [0, 1), got {shrink_threshold}")

    if not (math.isfinite(memory_entropy_weight) and memory_entropy_weight >= 0):
        raise ValueError(f"memory_entropy_weight must be finite and >= 0, got {memory_entropy_weight}")


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


def _build_variational_autoencoder(config: TrainingConfig, image_size: int, in_channels: int) -> nn.Module:
    return VariationalAutoencoder(
        image_size=image_size,
        latent_dim=config.latent_dim,
        hidden_dim=config.hidden_dim,
        in_channels=in_channels,
        kl_weight=config.kl_weight,
    )


def _build_memory_autoencoder(config: TrainingConfig, image_size: int, in_channels: int) -> nn.Module:
    return MemoryAutoencoder(
        image_size=image_size,
        latent_dim=config.latent_dim,
        hidden_dim=config.hidden_dim,
        in_channels=in_channels,
        memory_size=config.memory_size,
        shrink_threshold=config.shrink_threshold,
        memory_entropy_weight=config.memory_entropy_weight,
    )


def _build_context_encoding_autoencoder(config: TrainingConfig, image_size: int, in_channels: int) -> nn.Module:
    return ContextEncodingAutoencoder(
        image_size=image_size,
        latent_dim=config.latent_dim,
        hidden_dim=config.hidden_dim,
        in_channels=in_channels,
        erase_size=config.erase_size,
    )


# Builders by the name used in TrainingConfig.model. A new architecture is one entry here.
# Every model must provide encode(x), decode(z) and forward(x, latent_noise, generator) as
# ConvAutoencoder does, and return its extra training losses in AutoencoderOutput.extra_losses.
MODEL_BUILDERS: dict[str, Callable[[TrainingConfig, int, int], nn.Module]] = {
    "ae": _build_conv_autoencoder,
    "vae": _build_variational_autoencoder,
    "memae": _build_memory_autoencoder,
    "ceae": _build_context_encoding_autoencoder,
}


def build_model(config: TrainingConfig, image_size: int, in_channels: int = 1) -> nn.Module:
    """Build the untrained model named by ``config.model`` for square images of ``image_size``."""
    builder = MODEL_BUILDERS.get(config.model)
    if builder is None:
        raise ValueError(f"unknown model {config.model!r}. Supported models: {', '.join(sorted(MODEL_BUILDERS))}")

    return builder(config, image_size, in_channels)
