"""Label smoothing (Szegedy et al., 2016, https://arxiv.org/abs/1512.00567) and one-hot targets.

The convention is PyTorch's (``F.cross_entropy(..., label_smoothing=s)``): a target distribution ``p``
becomes ``(1 - s) * p + s / K``, so the true class keeps ``1 - s + s / K`` and every class gets ``s / K``.
Smoothing is linear, so it commutes with mixing: smoothing then mixing equals mixing then smoothing.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

__all__ = ["check_targets", "mixed_one_hot", "one_hot", "smooth"]


def check_targets(targets: object, name: str = "targets") -> Tensor:
    """Return ``targets`` if they are class indices ``(N,)`` (integer) or probabilities ``(N, K)`` (float).

    Raises:
        TypeError: if ``targets`` is not a tensor.
        ValueError: for any other shape or dtype, saying how to fix it.

    Example:
        >>> check_targets(torch.tensor([0, 2])).shape
        torch.Size([2])
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"Expected `{name}` to be a tensor of class indices (N,) or probabilities (N, K), "
            f"but got {type(targets).__name__}. Make the dataset return tensor targets."
        )
    integer = not torch.is_floating_point(targets) and not torch.is_complex(targets) and targets.dtype != torch.bool
    if (targets.ndim == 1 and integer) or (targets.ndim == 2 and torch.is_floating_point(targets)):
        return targets
    raise ValueError(
        f"Expected `{name}` as class indices of shape (N,) with an integer dtype or probabilities of shape (N, K) "
        f"with a float dtype, but got shape {tuple(targets.shape)} and dtype {targets.dtype}. "
        "Squeeze (N, 1) targets to (N,), cast float indices with `.long()`, or pass one-hot rows as float."
    )


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even) as torch rounds a float64 scalar."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def _check_range(targets: Tensor, num_classes: int) -> None:
    if targets.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(targets))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"Expected class indices in [0, {num_classes}), but got values in [{low}, {high}]. "
                "Pass the right `num_classes`, or remap the labels to 0..num_classes-1."
            )


def _check_smoothing(smoothing: float) -> None:
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"Expected `smoothing` to be a float in [0, 1), but got {smoothing!r}.")


def smooth(probs: Tensor, smoothing: float) -> Tensor:
    """Label smoothing of probability targets: ``(1 - smoothing) * probs + smoothing / K``.

    Args:
        probs: probabilities ``(N, K)``.
        smoothing: the mass spread uniformly over the ``K`` classes, in ``[0, 1)``.

    Returns:
        A new tensor ``(N, K)``; ``probs`` itself when ``smoothing`` is 0.

    Example:
        >>> smooth(torch.tensor([[1.0, 0.0]]), 0.2)
        tensor([[0.9000, 0.1000]])
    """
    _check_smoothing(smoothing)
    if smoothing == 0:
        return probs
    return probs * (1.0 - smoothing) + smoothing / probs.shape[-1]


def one_hot(targets: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Class indices ``(N,)`` to probabilities ``(N, K)``, optionally label-smoothed.

    Probability targets ``(N, K)`` pass through (smoothed if asked), so callers need not know which
    kind they hold. The result is ``float32`` for indices and keeps the dtype of probability targets.

    Args:
        targets: class indices ``(N,)`` (integer dtype) or probabilities ``(N, K)`` (float dtype).
        num_classes: the number of classes ``K``.
        smoothing: label smoothing in ``[0, 1)``, PyTorch's convention ``(1 - s) * p + s / K``.

    Returns:
        Probabilities ``(N, K)`` whose rows sum to 1.

    Raises:
        ValueError: for indices outside ``[0, num_classes)``, probabilities with a number of columns other
            than ``num_classes``, other shapes, or an invalid ``num_classes``/``smoothing``.

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
        >>> one_hot(torch.tensor([1]), 2, smoothing=0.1)
        tensor([[0.0500, 0.9500]])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    _check_smoothing(smoothing)
    targets = check_targets(targets)
    if targets.ndim == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(
                f"Expected probability targets with num_classes={num_classes} columns, but got shape "
                f"{tuple(targets.shape)}. Pass the matching `num_classes`."
            )
        return smooth(targets, smoothing)
    _check_range(targets, num_classes)
    # One pass: fill the off-value s/K, scatter the on-value 1 - s + s/K (timm's `mixup_target` convention).
    probs = torch.full((targets.shape[0], num_classes), smoothing / num_classes, device=targets.device)
    return probs.scatter_(1, targets.long()[:, None], 1.0 - smoothing + smoothing / num_classes)


def mixed_one_hot(
    targets: Tensor,
    num_classes: int,
    lam: float | Tensor,
    index: Tensor,
    smoothing: float = 0.0,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``smooth(lam * one_hot(targets) + (1 - lam) * one_hot(targets[index]))`` in one pass for index targets.

    Equal to mixing the rows of :func:`one_hot`, without materializing two ``(N, K)`` tensors: what the
    mixing callbacks use for index targets (large ``K`` makes the difference).

    Args:
        targets: class indices ``(N,)``.
        num_classes: ``K``.
        lam: the weight of each sample's own class: a float or ``(N,)``.
        index: the partner of each sample ``(N,)``.
        smoothing: label smoothing in ``[0, 1)``.
        out: optional float32 tensor ``(N, K)`` that receives the result for index targets (so that repeated
            calls allocate nothing); probability targets ignore it.

    Example:
        >>> mixed_one_hot(torch.tensor([0, 1]), 3, 0.75, torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500, 0.0000],
                [0.2500, 0.7500, 0.0000]])
    """
    probs = one_hot(targets, num_classes, smoothing) if targets.ndim == 2 else None
    if probs is not None:  # probabilities: mix the rows
        weight = lam.to(probs)[:, None] if isinstance(lam, Tensor) else float(lam)
        return probs[index.to(probs.device)].lerp_(probs, weight)
    _check_smoothing(smoothing)
    check_targets(targets)
    n = targets.shape[0]
    device = targets.device
    if device.type != "cpu":  # on CPU the scatter below checks the range itself (a GPU kernel would assert)
        _check_range(targets, num_classes)
    # Weights of the own class and of the partner's class, (N, 2) or (1, 2) broadcast to (N, 2), in the float32
    # arithmetic of mixing the smoothed one-hot rows: (1 - s) * lam and (1 - s) * (1 - lam).
    if isinstance(lam, Tensor):
        own = lam.to(device, torch.float32)
        weights = torch.stack([own, 1.0 - own], dim=1).mul_(1.0 - smoothing)
    else:
        keep, lam32 = _f32(1.0 - smoothing), _f32(float(lam))
        pair = [_f32(keep * lam32), _f32(keep * _f32(1.0 - lam32))]
        weights = torch.tensor([pair], dtype=torch.float32, device=device).expand(n, 2)
    labels = targets if targets.dtype == torch.int64 else targets.long()
    partners = labels[index if index.device == device else index.to(device)]
    classes = torch.stack([labels, partners], dim=1)  # (N, 2)
    if out is None:
        out = torch.full((n, num_classes), smoothing / num_classes, device=targets.device)
    elif out.shape != (n, num_classes) or out.dtype != torch.float32 or out.device != targets.device:
        raise ValueError(
            f"Expected `out` as float32 of shape ({n}, {num_classes}) on {targets.device}, but got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}. Pass `out=torch.empty({n}, {num_classes})`."
        )
    else:
        out.fill_(smoothing / num_classes)
    # One scatter for both classes: they add up when a sample and its partner share the class.
    try:
        return out.scatter_add_(1, classes, weights)
    except RuntimeError:
        _check_range(targets, num_classes)  # raises the error that says how to fix it
        raise
