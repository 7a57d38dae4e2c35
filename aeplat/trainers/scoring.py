"""Anomaly maps and scores of a trained autoencoder, in a form that torch.export can trace.

Scores point one way everywhere: higher means more abnormal. A pixel's score is its
squared reconstruction error, and an image's score is the mean over its C, H and W.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


def reconstruction_error_map(model: nn.Module, images: Tensor) -> Tensor:
    """Return the per-pixel squared error (N, C, H, W) of the model's reconstruction of images.

    The caller sets the model's mode (use eval mode for scoring) and the gradient mode.
    """
    reconstruction = model(images).reconstruction
    return (reconstruction - images).square()


def image_scores(error_maps: Tensor) -> Tensor:
    """Return the (N,) image anomaly scores of (N, C, H, W) error maps: the mean of each map."""
    return error_maps.mean(dim=(1, 2, 3))


class ErrorMapModel(nn.Module):
    """Frozen copy of a trained autoencoder that maps images to per-pixel anomaly scores.

    ``forward`` takes float32 images (N, C, H, W) in [0, 1] and returns their squared
    reconstruction error (N, C, H, W). The mean of a map over C, H and W is the image's
    score, as ``Trainer.score`` returns it. The copy stays in eval mode, so BatchNorm
    always uses its running statistics and later training of the original model does not
    change it. ``forward`` has no data-dependent Python control flow, so
    ``torch.export.export`` can trace it.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = copy.deepcopy(autoencoder)
        self.autoencoder.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ErrorMapModel:
        """Keep eval mode whatever ``mode`` is, because scoring must not update BatchNorm statistics."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return reconstruction_error_map(self.autoencoder, images)
