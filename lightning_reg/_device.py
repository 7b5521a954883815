"""Per-device numerics: the one place that decides how statistics are accumulated on a device."""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype in which sums of statistics are accumulated on ``device``: float64, or float32 on MPS.

    MPS has no float64; everywhere else float64 keeps sums over many batches exact to float32 precision.

    Args:
        device: where the accumulation happens.

    Example:
        >>> accumulation_dtype("cpu"), accumulation_dtype("mps")
        (torch.float64, torch.float32)
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
