"""Conversions between index targets and probability (soft) targets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hard_targets"]


def hard_targets(targets: Tensor) -> Tensor:
    """Class indices from targets that are either indices ``(N,)`` or probabilities ``(N, K)``.

    Mixing and smoothing callbacks turn index targets into probabilities; metrics such as
    ``torchmetrics.Accuracy`` want indices. This gives them back: the argmax of each row for soft
    targets, the targets unchanged for indices.

    Args:
        targets: class indices of shape ``(N,)`` (integer dtype), probabilities of shape ``(N, K)``, or the
            sparse ``MixedTargets`` of ``SparseMixingMixin`` (the class with the larger weight).

    Returns:
        Integer class indices of shape ``(N,)``.

    Raises:
        ValueError: if ``targets`` is neither 1-D nor 2-D.

    Example:
        >>> import torch
        >>> hard_targets(torch.tensor([[0.1, 0.9], [0.7, 0.3]]))
        tensor([1, 0])
        >>> hard_targets(torch.tensor([2, 0]))
        tensor([2, 0])
    """
    from lightning_reg.mixins import MixedTargets

    if isinstance(targets, MixedTargets):
        return targets.hard()
    if targets.ndim == 1:
        return targets
    if targets.ndim == 2:
        return targets.argmax(dim=1)
    raise ValueError(
        "Expected targets of shape (N,) (class indices) or (N, K) (probabilities), "
        f"but got shape {tuple(targets.shape)}."
    )


def is_soft(targets: Tensor) -> bool:
    """Whether ``targets`` are probabilities ``(N, K)`` of a floating dtype rather than indices ``(N,)``."""
    return targets.ndim == 2 and torch.is_floating_point(targets)
