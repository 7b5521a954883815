"""Label smoothing (Szegedy et al., 2016, https://arxiv.org/abs/1512.00567) and one-hot targets.

The convention is PyTorch's (``F.cross_entropy(..., label_smoothing=s)``): a target distribution ``p``
becomes ``(1 - s) * p + s / K``. Smoothing is linear, so it commutes with mixing. Multi-label (multi-hot)
targets are smoothed per entry towards 1/2 with ``multi_label=True`` (timm's convention). See
docs/label_smoothing.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg.functional import _checks as checks
from lightning_reg.functional._targets import scatter, smooth_rows, target_dtype

__all__ = ["one_hot", "smooth"]


def smooth(probs: Tensor, smoothing: float, *, multi_label: bool = False) -> Tensor:
    """Label smoothing of probability targets: ``(1 - smoothing) * probs + smoothing / K``.

    Args:
        probs: probabilities ``(N, K)``, or multi-hot rows with ``multi_label``.
        smoothing: the mass spread uniformly over the ``K`` classes, in ``[0, 1)``.
        multi_label: smooth every entry as a binary label, ``(1 - smoothing) * probs + smoothing / 2``.

    Returns:
        A new tensor ``(N, K)``; ``probs`` itself when ``smoothing`` is 0.

    Example:
        >>> smooth(torch.tensor([[1.0, 0.0]]), 0.2)
        tensor([[0.9000, 0.1000]])
        >>> smooth(torch.tensor([[1.0, 1.0, 0.0]]), 0.2, multi_label=True)
        tensor([[0.9000, 0.9000, 0.1000]])
    """
    return smooth_rows(probs, checks.check_smoothing(smoothing), multi_label)


def one_hot(
    targets: Tensor,
    num_classes: int,
    smoothing: float = 0.0,
    *,
    multi_label: bool = False,
    validate: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Class indices ``(N,)`` to probabilities ``(N, K)``, optionally label-smoothed.

    Probability targets ``(N, K)`` pass through (smoothed if asked), so callers need not know which kind they
    hold; they keep their dtype, built rows get ``dtype`` (torch's default float dtype when ``None``).

    Args:
        targets: class indices ``(N,)`` (integer dtype) or probabilities ``(N, K)`` (float dtype).
        num_classes: the number of classes ``K``.
        smoothing: label smoothing in ``[0, 1)``, PyTorch's convention ``(1 - s) * p + s / K``.
        multi_label: the targets are multi-hot rows ``(N, K)`` of independent binary labels (see :func:`smooth`).
        validate: check the label range on accelerators too (a host sync); on the CPU it is always checked.
        dtype: the dtype of rows built from indices.

    Returns:
        Probabilities ``(N, K)`` whose rows sum to 1.

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
        >>> one_hot(torch.tensor([1]), 2, smoothing=0.1)
        tensor([[0.0500, 0.9500]])
    """
    checks.check_num_classes(num_classes)
    checks.check_smoothing(smoothing)
    targets = checks.check_targets(targets)
    if targets.ndim == 2:
        checks.check_columns(targets, num_classes)
        return smooth_rows(targets, smoothing, multi_label)
    if multi_label:
        raise ValueError(checks.MULTI_LABEL_INDICES.format(shape=tuple(targets.shape)))
    if validate and targets.device.type != "cpu":
        checks.check_range(targets, num_classes)
    # One pass: fill the off-value s/K, scatter the on-value 1 - s + s/K (timm's `mixup_target` convention).
    probs = torch.full(
        (targets.shape[0], num_classes), smoothing / num_classes, device=targets.device, dtype=target_dtype(dtype)
    )
    on = 1.0 - smoothing + smoothing / num_classes
    return scatter(probs, targets.long()[:, None], on, num_classes, targets, add=False)
