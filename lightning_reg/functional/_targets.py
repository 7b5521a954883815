"""Building (mixed, smoothed) target rows: the one-pass kernel the mixing callbacks use, and its helpers.

Label range without a host sync: on the CPU the scatter that builds the rows checks every index itself, and a
failure is re-raised with a message that says how to fix it. On an accelerator, reading the range back would stall
the stream on every batch: ``validate=False`` skips it and leaves out-of-range labels to the device kernel's own
bounds assertion, as ``F.cross_entropy`` does (see docs/label_smoothing.md).
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from lightning_reg.functional._checks import (
    MULTI_LABEL_INDICES,
    check_columns,
    check_num_classes,
    check_range,
    check_smoothing,
    check_targets,
)


def f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even) as torch rounds a float64 scalar."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def target_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of built probability rows: ``dtype``, else torch's default float dtype (float32 unless changed)."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Expected `dtype` to be a floating torch.dtype or None, but got {dtype!r}.")
    return dtype


def smooth_rows(probs: Tensor, smoothing: float, multi_label: bool) -> Tensor:
    """``(1 - s) * probs + s / K`` (``s / 2`` per entry for multi-hot rows); ``probs`` itself when ``s`` is 0."""
    if smoothing == 0:
        return probs
    return probs * (1.0 - smoothing) + smoothing / (2 if multi_label else probs.shape[-1])


def scatter(out: Tensor, index: Tensor, src: Tensor | float, num_classes: int, labels: Tensor, add: bool) -> Tensor:
    """``out.scatter_`` / ``scatter_add_`` along dim 1; an out-of-range label raises the error that says the fix."""
    try:
        if add:
            assert isinstance(src, Tensor)
            return out.scatter_add_(1, index, src)
        return out.scatter_(1, index, src)
    except RuntimeError as error:
        if "out of bounds" not in str(error):
            raise
        check_range(labels, num_classes)  # raises the error that says how to fix it
        raise


def mixed_one_hot(
    targets: Tensor,
    num_classes: int,
    lam: float | Tensor,
    index: Tensor,
    smoothing: float = 0.0,
    *,
    out: Tensor | None = None,
    shift: int | None = None,
    multi_label: bool = False,
    validate: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``smooth(lam * one_hot(targets) + (1 - lam) * one_hot(targets[index]))`` in one pass for index targets.

    Equal to mixing the rows of ``one_hot``, without materializing two ``(N, K)`` tensors (large ``K`` makes the
    difference). ``out`` ``(N, K)`` receives the rows built from indices; ``shift`` is ``k`` when ``index`` is the
    roll ``(i + k) % N`` (then ``index`` is not read); ``validate`` checks the label range on accelerators too.

    Example:
        >>> mixed_one_hot(torch.tensor([0, 1]), 3, 0.75, torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500, 0.0000],
                [0.2500, 0.7500, 0.0000]])
    """
    check_num_classes(num_classes)
    check_smoothing(smoothing)
    targets = check_targets(targets)
    if targets.ndim == 2:  # probabilities or multi-hot rows: mix the rows
        check_columns(targets, num_classes)
        probs = smooth_rows(targets, smoothing, multi_label)
        weight = lam.to(probs)[:, None] if isinstance(lam, Tensor) else float(lam)
        partners = probs.roll(-shift, 0) if shift is not None else probs[index.to(probs.device)]
        return partners.lerp_(probs, weight)
    if multi_label:
        raise ValueError(MULTI_LABEL_INDICES.format(shape=tuple(targets.shape)))
    n = targets.shape[0]
    device = targets.device
    out_dtype = target_dtype(dtype) if out is None else out.dtype
    if validate and device.type != "cpu":  # on CPU the scatter below checks the range itself
        check_range(targets, num_classes)
    # Weights of the own class and of the partner's class, (N, 2), in the arithmetic of mixing the smoothed
    # one-hot rows: (1 - s) * lam and (1 - s) * (1 - lam). A float lam is filled in (a kernel argument, no copy).
    weights = torch.empty((n, 2), dtype=out_dtype, device=device)
    if isinstance(lam, Tensor):
        own = lam.to(device, out_dtype)
        torch.stack([own, 1.0 - own], dim=1, out=weights).mul_(1.0 - smoothing)
    elif out_dtype == torch.float32:
        keep, lam32 = f32(1.0 - smoothing), f32(float(lam))  # float32 rounding, as torch would do it
        weights[:, 0].fill_(f32(keep * lam32))
        weights[:, 1].fill_(f32(keep * f32(1.0 - lam32)))
    else:
        weights[:, 0].fill_((1.0 - smoothing) * float(lam))
        weights[:, 1].fill_((1.0 - smoothing) * (1.0 - float(lam)))
    labels = targets if targets.dtype == torch.int64 else targets.long()
    if shift is not None:
        partners = labels.roll(-shift, 0)  # labels[(i + k) % N], without reading `index`
    else:
        partners = labels[index if index.device == device else index.to(device)]
    classes = torch.stack([labels, partners], dim=1)  # (N, 2)
    if out is None:
        out = torch.full((n, num_classes), smoothing / num_classes, device=device, dtype=out_dtype)
    elif out.shape != (n, num_classes) or not out.dtype.is_floating_point or out.device != device:
        raise ValueError(
            f"Expected `out` as a float tensor of shape ({n}, {num_classes}) on {device}, but got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}. Pass `out=torch.empty({n}, {num_classes})`."
        )
    else:
        out.fill_(smoothing / num_classes)
    # One scatter for both classes: they add up when a sample and its partner share the class.
    return scatter(out, classes, weights, num_classes, targets, add=True)
