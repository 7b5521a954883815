"""Digits-C: corrupted copies of the digits' test images at five severities, seeded (after ImageNet-C).

Hendrycks & Dietterich (ICLR 2019, https://arxiv.org/abs/1903.12261) measure robustness to covariate shift on
copies of a test set under common corruptions, each at five severities. These are the corruptions that make sense
on 8x8 grey digits with pixel values 0..16. The severities were chosen on a plain ``cnn_small`` trained on digits
0-7 (98.6 % clean, seed 0): severity 1 cost it 1-2 points, severity 3 between 20 and 46, severity 5 between 42 and 76,
so that the middle severities can be read (``benchmarks/results/regimes.md`` has the measured curves of every model):

- ``gaussian_noise``: additive pixel noise of standard deviation ``sigma`` (pixel units), clipped to 0..16;
- ``gaussian_blur``: a Gaussian blur of ``sigma`` pixels (separable, zero padding: the background is 0);
- ``contrast``: each image pulled towards its mean, ``m + c (x - m)``;
- ``affine``: a rotation by up to ``degrees`` (random sign) and a shift by up to ``pixels`` in a random direction,
  bilinear, the uncovered border filled with background.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "SEVERITY_PARAMS", "Corruption", "apply_affine", "corrupt_digits"]

Corruption = Literal["gaussian_noise", "gaussian_blur", "contrast", "affine"]
CORRUPTIONS: tuple[Corruption, ...] = get_args(Corruption)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
_MAX_PIXEL = 16.0  # scikit-learn's digits hold 0..16

# corruption -> its parameter at severities 1..5
SEVERITY_PARAMS: dict[str, tuple[float | tuple[float, float], ...]] = {
    "gaussian_noise": (2.0, 3.0, 4.0, 5.0, 6.0),  # noise std, pixel units (of 0..16)
    "gaussian_blur": (0.4, 0.5, 0.6, 0.7, 0.8),  # blur std, pixels
    "contrast": (0.8, 0.7, 0.6, 0.5, 0.4),  # contrast factor c
    "affine": ((5.0, 0.25), (10.0, 0.5), (15.0, 0.75), (20.0, 1.0), (25.0, 1.25)),  # (max degrees, max pixels)
}


def corrupt_digits(images: Tensor, corruption: Corruption, severity: int, *, seed: int = 0) -> Tensor:
    """A corrupted copy of raw digit images ``(N, 8, 8)`` (any square size) with pixel values in [0, 16].

    The result is a function of ``(images, corruption, severity, seed)`` only: the random draws come from a
    generator seeded from those, never from the global RNG, so every call gives the same images and the
    corruptions of a set are independent of each other.

    Args:
        images: raw images ``(N, H, W)``, values in [0, 16] (before any standardization).
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong).
        seed: seed of the random draws (noise, angles, shifts).

    Returns:
        Float32 images ``(N, H, W)`` in [0, 16].

    Example:
        >>> x = torch.zeros(2, 8, 8)
        >>> x[:, 2:6, 3:5] = 16.0
        >>> y = corrupt_digits(x, "contrast", 5)
        >>> tuple(y.shape), float(y.max()) < 16.0, torch.equal(y, corrupt_digits(x, "contrast", 5))
        ((2, 8, 8), True, True)
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"Expected `corruption` to be one of {CORRUPTIONS}, but got {corruption!r}.")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"Expected `severity` to be an int in {SEVERITIES}, but got {severity!r}.")
    if not isinstance(images, Tensor) or images.ndim != 3:
        raise ValueError(f"Expected `images` to be a (N, H, W) tensor of raw pixels, but got {_shape(images)}.")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > _MAX_PIXEL):
        raise ValueError(
            f"Expected raw pixel values in [0, {_MAX_PIXEL:g}] (before standardization), but got values from "
            f"{float(images.min()):g} to {float(images.max()):g}."
        )
    x = images.to(torch.float32)
    index = CORRUPTIONS.index(corruption)
    generator = torch.Generator().manual_seed(1000 * seed + 10 * index + severity)
    param = SEVERITY_PARAMS[corruption][severity - 1]
    if corruption == "gaussian_noise":
        assert isinstance(param, float)
        noise = torch.randn(x.shape, generator=generator)
        return (x + param * noise).clamp(0.0, _MAX_PIXEL)
    if corruption == "gaussian_blur":
        assert isinstance(param, float)
        return _blur(x, param)
    if corruption == "contrast":
        assert isinstance(param, float)
        mean = x.mean(dim=(1, 2), keepdim=True)
        return mean + param * (x - mean)
    assert isinstance(param, tuple)
    return _affine(x, *param, generator=generator)


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = min(3, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (2r + 1,)
    images = x.unsqueeze(1)  # (N, 1, H, W)
    images = F.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))  # along W
    images = F.conv2d(images, kernel.view(1, 1, -1, 1), padding=(radius, 0))  # along H
    return images.squeeze(1).clamp(0.0, _MAX_PIXEL)


def _affine(x: Tensor, degrees: float, pixels: float, *, generator: torch.Generator) -> Tensor:
    n = len(x)
    # magnitudes in [max / 2, max]: every image is moved (a uniform draw from 0 would leave many almost intact)
    sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    angle = degrees * sign * (0.5 + 0.5 * torch.rand(n, generator=generator))
    direction = 2 * math.pi * torch.rand(n, generator=generator)
    distance = pixels * (0.5 + 0.5 * torch.rand(n, generator=generator))
    shift = torch.stack([distance * torch.cos(direction), distance * torch.sin(direction)], dim=1)
    return apply_affine(x, angle, shift)


def apply_affine(x: Tensor, degrees: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image ``(N, H, W)`` by ``degrees`` ``(N,)`` about its centre and move it by ``shift`` ``(N, 2)``.

    ``shift`` is ``(right, down)`` in pixels. Bilinear sampling; what comes in from outside the image is 0.

    Example:
        >>> x = torch.zeros(1, 4, 4)
        >>> x[0, 1, 1] = 16.0
        >>> apply_affine(x, torch.zeros(1), torch.tensor([[1.0, 2.0]]))[0].nonzero().tolist()  # 1 right, 2 down
        [[3, 2]]
    """
    n, height, width = x.shape
    angle = torch.deg2rad(degrees.float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output to input coordinates (normalized to [-1, 1]): the inverse of the motion
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = -shift[:, 0].float() * 2 / width
    theta[:, 1, 2] = -shift[:, 1].float() * 2 / height
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    moved = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved.squeeze(1).clamp(0.0, _MAX_PIXEL)
