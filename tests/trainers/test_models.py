from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aeplat.trainers.loop import TrainingConfig
from aeplat.trainers.models import AutoencoderOutput, ConvAutoencoder, build_model


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("latent_dim", [1, 4, 16, 128])
def test_autoencoder_shapes(image_size: int, latent_dim: int) -> None:
    model = ConvAutoencoder(image_size=image_size, latent_dim=latent_dim, hidden_dim=64)
    images = torch.rand(3, 1, image_size, image_size)

    output = model(images)

    assert isinstance(output, AutoencoderOutput)
    assert output.latent.shape == (3, latent_dim)
    assert output.reconstruction.shape == (3, 1, image_size, image_size)
    assert model.encode(images).shape == (3, latent_dim)
    assert model.decode(torch.randn(3, latent_dim)).shape == (3, 1, image_size, image_size)


def test_autoencoder_output_in_unit_range() -> None:
    model = ConvAutoencoder(image_size=32, latent_dim=4, hidden_dim=64)

    reconstruction = model(torch.rand(4, 1, 32, 32)).reconstruction

    assert reconstruction.min() >= 0.0
    assert reconstruction.max() <= 1.0


@pytest.mark.parametrize(("image_size", "flat_size"), [(16, 64), (32, 256), (64, 1024), (128, 4096)])
def test_encoder_flatten_size(image_size: int, flat_size: int) -> None:
    model = ConvAutoencoder(image_size=image_size, latent_dim=16, hidden_dim=1024)

    first_linear = next(module for module in model.encoder if isinstance(module, nn.Linear))

    assert first_linear.in_features == flat_size
    assert first_linear.out_features == 1024


def test_encoder_channels() -> None:
    model = ConvAutoencoder(image_size=64, in_channels=3)

    convolutions = [module for module in model.encoder if isinstance(module, nn.Conv2d)]

    assert [conv.out_channels for conv in convolutions] == [16, 32, 64, 64]
    assert convolutions[0].in_channels == 3
    assert all(conv.kernel_size == (4, 4) and conv.stride == (2, 2) for conv in convolutions)


def test_decoder_channels() -> None:
    model = ConvAutoencoder(image_size=64, in_channels=3)

    transposed = [module for module in model.decoder_body if isinstance(module, nn.ConvTranspose2d)]

    assert [conv.out_channels for conv in transposed] == [64, 32, 16, 3]
    assert isinstance(model.decoder_body[-1], nn.Sigmoid)


def test_latent_noise_reaches_decoder_only() -> None:
    model = ConvAutoencoder(image_size=32, latent_dim=4, hidden_dim=64).eval()
    images = torch.rand(2, 1, 32, 32)
    decoder_inputs = []

    def shift_latent(latent: torch.Tensor) -> torch.Tensor:
        decoder_inputs.append(latent + 5.0)
        return decoder_inputs[-1]

    with torch.no_grad():
        noisy = model(images, latent_noise=shift_latent)
        clean = model(images)

    assert torch.equal(noisy.latent, clean.latent)
    assert torch.equal(noisy.reconstruction, model.decode(decoder_inputs[0]))
    assert not torch.equal(noisy.reconstruction, clean.reconstruction)


@pytest.mark.parametrize("image_size", [0, 8, 24, 33, 65, -16])
def test_invalid_image_size_rejected(image_size: int) -> None:
    with pytest.raises(ValueError, match=f"multiple of 16.*got {image_size}"):
        ConvAutoencoder(image_size=image_size)


@pytest.mark.parametrize("latent_dim", [0, -1])
def test_invalid_latent_dim_rejected(latent_dim: int) -> None:
    with pytest.raises(ValueError, match=f"latent_dim must be at least 1, got {latent_dim}"):
        ConvAutoencoder(latent_dim=latent_dim)


def test_wrong_input_shape_rejected() -> None:
    model = ConvAutoencoder(image_size=32, latent_dim=4, hidden_dim=64)

    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\), got \(2, 1, 64, 64\)"):
        model(torch.rand(2, 1, 64, 64))


def test_build_model_ae() -> None:
    config = TrainingConfig(latent_dim=8, hidden_dim=128)

    model = build_model(config, image_size=32, in_channels=2)

    assert isinstance(model, ConvAutoencoder)
    assert model.latent_dim == 8
    assert model.in_channels == 2
    assert model(torch.rand(2, 2, 32, 32)).latent.shape == (2, 8)


def test_build_model_unknown_name() -> None:
    # TrainingConfig itself rejects unknown names, so a plain namespace replaces it here.
    config = SimpleNamespace(model="gan", latent_dim=16, hidden_dim=64)

    with pytest.raises(ValueError, match="unknown model 'gan'. Supported models: ae, ceae, memae, vae"):
        build_model(config, image_size=32)
