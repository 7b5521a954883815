"""Bernoulli keep-masks drawn from a ``torch.Generator`` that may live on another device than the data."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["keep_mask"]


def _same_device(generator: torch.Generator, device: torch.device) -> bool:
    own = generator.device
    if own.type != device.type:
        return False
    if own.type == "cpu" or (own.index is not None and device.index is not None):
        return own.index == device.index
    current = torch.get_device_module(own.type).current_device()  # an index left out means the current device
    return (own.index if own.index is not None else current) == (device.index if device.index is not None else current)


def keep_mask(
    shape: Sequence[int],
    keep_prob: float,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A mask of ones (probability ``keep_prob``) and zeros of ``shape`` on ``device``.

    torch's ``bernoulli_`` needs a generator of the tensor's own device ("Expected a 'cuda' device type for
    generator" for a CPU generator and a CUDA tensor). With a generator elsewhere, the mask is drawn on the
    generator's device and copied over: the same generator state then gives the same mask on every device
    (CPU-vs-CUDA parity), and the generator advances as it would on the CPU.

    Example:
        >>> keep_mask((2, 3), 0.5, dtype=torch.float32, device=torch.device("meta"), generator=torch.Generator()).device
        device(type='meta')
    """
    if generator is None or _same_device(generator, device):
        return torch.empty(tuple(shape), dtype=dtype, device=device).bernoulli_(keep_prob, generator=generator)
    keep = torch.empty(tuple(shape), dtype=dtype, device=generator.device).bernoulli_(keep_prob, generator=generator)
    return keep.to(device, non_blocking=True)
