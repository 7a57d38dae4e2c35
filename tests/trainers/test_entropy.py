"""The entropy estimate against analytic entropies of known distributions.

For a distribution much wider than one unit bin, the estimate approximates the
differential entropy in bits. Each case is checked within TOLERANCE_BITS per dimension,
which covers the model's fit and the sampling error of 4,000 samples (about 0.02 bits).
"""

from __future__ import annotations

import math

import pytest
import torch

from aeplat.trainers.entropy import (
    LIKELIHOOD_FLOOR,
    FactorizedEntropyModel,
    add_uniform_noise,
    estimate_entropy_bits,
    fit_entropy_model,
)

TOLERANCE_BITS = 0.1
NUM_SAMPLES = 4000


def gaussian_entropy_bits(sigma: float) -> float:
    return 0.5 * math.log2(2 * math.pi * math.e * sigma**2)


def gaussian(sigma: float, dims: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-50.0, 100.0, dims) if dims > 1 else torch.zeros(1)
    return torch.randn(NUM_SAMPLES, dims, generator=generator) * sigma + offsets


def uniform(low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(NUM_SAMPLES, 1, generator=generator)


def laplace(scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    magnitude = -scale * torch.log1p(-torch.rand(NUM_SAMPLES, 1, generator=generator))
    sign = torch.where(torch.rand(NUM_SAMPLES, 1, generator=generator) < 0.5, -1.0, 1.0)
    return sign * magnitude


KNOWN_DISTRIBUTIONS = [
    pytest.param(gaussian(8.0, 1, seed=1), gaussian_entropy_bits(8.0), id="gaussian-1d-sigma8"),
    pytest.param(gaussian(8.0, 4, seed=2), 4 * gaussian_entropy_bits(8.0), id="gaussian-4d-sigma8"),
    pytest.param(uniform(0.0, 32.0, seed=3), math.log2(32.0), id="uniform-0-32"),
    pytest.param(laplace(4.0, seed=4), math.log2(2 * math.e * 4.0), id="laplace-scale4"),
]


@pytest.mark.parametrize(("samples", "expected_bits"), KNOWN_DISTRIBUTIONS)
def test_estimate_matches_analytic_entropy(samples: torch.Tensor, expected_bits: float) -> None:
    dims = samples.shape[1]

    estimate = estimate_entropy_bits(samples, seed=0)

    assert abs(estimate - expected_bits) <= TOLERANCE_BITS * dims, (estimate, expected_bits)


def test_estimate_is_scale_sensitive() -> None:
    wide = estimate_entropy_bits(gaussian(8.0, 1, seed=5), seed=0)
    narrow = estimate_entropy_bits(gaussian(2.0, 1, seed=5), seed=0)

    # Shrinking a distribution 4 times removes log2(4) = 2 bits.
    assert abs((wide - narrow) - 2.0) <= TOLERANCE_BITS


def test_estimate_of_narrow_code_near_zero() -> None:
    # A code much narrower than one bin carries almost no information at unit noise.
    estimate = estimate_entropy_bits(gaussian(0.05, 1, seed=6), seed=0)

    assert 0.0 <= estimate < 0.3


def test_estimate_reproducible_with_seed() -> None:
    samples = gaussian(8.0, 1, seed=7)

    first = estimate_entropy_bits(samples, steps=100, seed=3)
    second = estimate_entropy_bits(samples, steps=100, seed=3)

    assert first == second


def test_likelihood_sums_to_one_over_bins() -> None:
    torch.manual_seed(0)
    model = FactorizedEntropyModel(num_channels=3)
    bin_centres = torch.arange(-400, 401, dtype=torch.float32).unsqueeze(1).expand(-1, 3)

    total = model.likelihood(bin_centres).sum(dim=0)

    # The bins telescope: their sum is c(400.5) - c(-400.5), about 1 for an increasing c.
    assert torch.allclose(total, torch.ones(3), atol=1e-4)


def test_likelihood_shape_and_range() -> None:
    model = FactorizedEntropyModel(num_channels=5)
    latents = torch.randn(7, 5) * 20

    likelihood = model.likelihood(latents)

    assert likelihood.shape == (7, 5)
    assert (likelihood >= LIKELIHOOD_FLOOR).all()
    assert (likelihood <= 1.0).all()
    assert model(latents).shape == (7,)


@pytest.mark.parametrize("value", [1e4, -1e4, 3e38])
def test_far_tails_stay_finite(value: float) -> None:
    model = FactorizedEntropyModel(num_channels=2)
    latents = torch.full((3, 2), value)

    bits = model(latents)

    assert torch.isfinite(bits).all()
    assert (bits <= -2 * math.log2(LIKELIHOOD_FLOOR) + 1e-3).all()


def test_upper_tail_is_accurate() -> None:
    # Without the sign trick both sigmoids round to 1 and the likelihood collapses to the floor.
    model = FactorizedEntropyModel(num_channels=1)
    latents = torch.tensor([[-60.0], [60.0]])

    likelihood = model.likelihood(latents)

    assert (likelihood > 10 * LIKELIHOOD_FLOOR).all()


def test_floor_passes_gradient_towards_density() -> None:
    model = FactorizedEntropyModel(num_channels=1)
    latents = torch.tensor([[250.0]], requires_grad=True)

    assert model.likelihood(latents).item() == pytest.approx(LIKELIHOOD_FLOOR)

    model(latents).sum().backward()

    # The rate grows further out, so its gradient is positive and descent moves z inwards.
    assert latents.grad.item() > 0


def test_rate_gradient_reaches_parameters() -> None:
    model = FactorizedEntropyModel(num_channels=2)

    model(torch.randn(16, 2) * 5).mean().backward()

    for parameter in model.parameters():
        assert parameter.grad is not None
        assert torch.isfinite(parameter.grad).all()


def test_wrong_latent_shape_rejected() -> None:
    model = FactorizedEntropyModel(num_channels=4)

    with pytest.raises(ValueError, match=r"shape \(N, 4\), got \(8, 3\)"):
        model.likelihood(torch.zeros(8, 3))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_channels": 0}, "num_channels must be at least 1, got 0"),
        ({"num_channels": 2, "filters": (3, 0)}, "every filter width must be at least 1"),
        ({"num_channels": 2, "init_scale": 0.0}, "init_scale must be a finite number > 0, got 0.0"),
    ],
)
def test_invalid_arguments_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FactorizedEntropyModel(**arguments)


def test_uniform_noise_range_and_reproducibility() -> None:
    latents = torch.zeros(10_000, 2)

    first = add_uniform_noise(latents, torch.Generator().manual_seed(1))
    second = add_uniform_noise(latents, torch.Generator().manual_seed(1))

    assert torch.equal(first, second)
    assert first.min() >= -0.5
    assert first.max() < 0.5
    assert abs(first.mean().item()) < 0.01
    assert first.var().item() == pytest.approx(1 / 12, rel=0.05)


def test_fit_returns_eval_model() -> None:
    model = fit_entropy_model(gaussian(3.0, 4, seed=8), steps=20, lr=1e-2, seed=0)

    assert model.num_channels == 4
    assert not model.training


def test_fit_rejects_non_finite_latents() -> None:
    latents = torch.randn(100, 2)
    latents[3, 1] = float("nan")

    with pytest.raises(ValueError, match="1 latent values are NaN or infinite"):
        fit_entropy_model(latents, steps=10, lr=1e-2, seed=0)


def test_fit_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, d\) with N >= 2, got \(100,\)"):
        fit_entropy_model(torch.randn(100), steps=10, lr=1e-2, seed=0)
