"""CutMix (Yun et al., 2019, https://arxiv.org/abs/1905.04899): paste a box from the partner sample.

Draw, then apply: :func:`sample_box` draws the box (timm's ``rand_bbox``: side ``L * (1 - lam) ** (1 / d)``, a
uniform centre, clipped at the borders; or timm's ``rand_bbox_minmax`` with ``minmax``) from a ``torch.Generator``;
:func:`cutmix` pastes it and mixes the targets by the fraction actually kept. The box covers the last two dims of
images ``(N, C, H, W)`` and the time axis of sequences ``(N, T)`` / ``(N, T, D)``; 5-D inputs (volumes or videos)
need ``dims=`` (see docs/mixing.md). A ``(N,)`` tensor ``lam`` gives every sample its own box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_reg.functional._apply import kept_fraction, mix_targets, paste
from lightning_reg.functional._checks import (
    Layout,
    check_box,
    check_index,
    check_minmax,
    check_mix_targets,
    check_out,
    resolve_dims,
)
from lightning_reg.functional._draws import cyclic_shift, generator_device

__all__ = ["Box", "Layout", "cutmix", "sample_box"]


class Box(NamedTuple):
    """Half-open boxes ``[lo, hi)`` along the mixed dims.

    Attributes:
        lo: int64 ``(B, d)``: the first index of the box along each of the ``d`` dims; ``B`` is 1 (one box
            for the batch) or ``N`` (one per sample).
        hi: int64 ``(B, d)``: one past the last index.

    Example:
        >>> box = Box.from_xyxy(torch.tensor([[0, 0, 4, 2]]))  # torchvision's x1, y1, x2, y2: rows 0-1, columns 0-3
        >>> box.lo.tolist(), box.hi.tolist(), box.to_xyxy().tolist()
        ([[0, 0]], [[2, 4]], [[0, 0, 4, 2]])
    """

    lo: Tensor
    hi: Tensor

    @classmethod
    def from_xyxy(cls, boxes: Tensor) -> Box:
        """Image boxes from torchvision's ``xyxy`` format ``(B, 4)``: ``[x1, y1, x2, y2]``, ``x`` along the width.

        ``x2`` and ``y2`` are exclusive, as torchvision's ``CutMix`` pastes ``[y1:y2, x1:x2]``.
        """
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.is_floating_point():
            got = f"shape {tuple(boxes.shape)} dtype {boxes.dtype}" if isinstance(boxes, Tensor) else repr(boxes)
            raise ValueError(f"Expected integer boxes (B, 4) as [x1, y1, x2, y2], but got {got}.")
        boxes = boxes.long()
        return cls(lo=boxes[:, [1, 0]], hi=boxes[:, [3, 2]])

    def to_xyxy(self) -> Tensor:
        """These image boxes (``d == 2``, rows then columns) as ``(B, 4)`` ``[x1, y1, x2, y2]`` (torchvision's)."""
        if self.lo.ndim != 2 or self.lo.shape[1] != 2:
            raise ValueError(f"Expected image boxes with d == 2 (height, width), but got lo {tuple(self.lo.shape)}.")
        return torch.stack([self.lo[:, 1], self.lo[:, 0], self.hi[:, 1], self.hi[:, 0]], dim=1)


def sample_box(
    lam: float | Tensor,
    sizes: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    minmax: tuple[float, float] | None = None,
) -> Box:
    """Draw a CutMix box of volume about ``(1 - lam)`` of ``sizes``, clipped at the borders.

    Args:
        lam: a float (one box for the batch) or a ``(N,)`` tensor (one box per sample).
        sizes: the lengths of the dims to cut along, e.g. ``(H, W)``.
        generator: the source of randomness; the global RNG when ``None``.
        minmax: timm's ``cutmix_minmax``: ignore ``lam`` and draw each side uniformly from
            ``[int(L * lo), int(L * hi))`` and the box inside the sample (never clipped), as timm's
            ``rand_bbox_minmax``; the fraction kept then follows from the box alone.

    Returns:
        A :class:`Box` on the generator's device.

    Example:
        >>> box = sample_box(0.75, (8, 8), generator=torch.Generator().manual_seed(0))
        >>> box.lo.shape, bool(((box.hi - box.lo) <= 4).all())
        (torch.Size([1, 2]), True)
    """
    device = generator_device(generator)
    d = len(sizes)
    if d == 0 or any(s < 1 for s in sizes):
        raise ValueError(f"Expected `sizes` to be positive lengths, but got {tuple(sizes)!r}.")
    if minmax is not None:
        count = lam.shape[0] if isinstance(lam, Tensor) else 1
        return _sample_minmax_box(count, [int(s) for s in sizes], check_minmax(minmax), generator, device)
    if not isinstance(lam, Tensor):
        return _sample_one_box(float(lam), [int(s) for s in sizes], generator, device)
    lam_t = lam.detach().to(device, torch.float64)
    length = torch.tensor(list(sizes), device=device, dtype=torch.float64)  # (d,)
    ratio = (1.0 - lam_t).clamp(0.0, 1.0).pow(1.0 / d)  # (B,)
    cut = (length * ratio[:, None]).floor().long()  # (B, d), truncated as timm does
    # A uniform centre in [0, L) per dim: floor(u * L) is exact for the small L of images.
    centre = (torch.rand(cut.shape, generator=generator, device=device, dtype=torch.float64) * length).long()
    lo = (centre - cut // 2).clamp(min=0)
    hi = torch.minimum(centre + (cut + 1) // 2, length.long())
    return Box(lo, hi)


def _sample_minmax_box(
    count: int, sizes: list[int], minmax: tuple[float, float], generator: torch.Generator | None, device: torch.device
) -> Box:
    """Boxes as timm's ``rand_bbox_minmax``, per dim: side ``~ U{int(L lo) .. int(L hi) - 1}``, corner ``0..L-side``."""
    lows = torch.tensor([int(length * minmax[0]) for length in sizes], device=device)
    highs = torch.tensor([max(int(length * minmax[1]), int(length * minmax[0]) + 1) for length in sizes], device=device)
    length = torch.tensor(sizes, device=device)
    u = torch.rand((2, count, len(sizes)), generator=generator, device=device, dtype=torch.float64)
    side = lows + (u[0] * (highs - lows)).long()  # uniform integers in [low, high)
    lo = (u[1] * (length - side + 1)).long()  # uniform in [0, L - side]
    return Box(lo, lo + side)


def _sample_one_box(lam: float, sizes: list[int], generator: torch.Generator | None, device: torch.device) -> Box:
    """:func:`sample_box` for one box: the same draws and formula in Python floats (fewer tiny tensor ops).

    ``x ** (1 / d)`` in Python and in torch may differ in the last bit (torch's pow is not correctly rounded);
    that moves a box side by one pixel only when ``L * ratio`` lies within one rounding step of an integer.
    """
    d = len(sizes)
    ratio = min(max(1.0 - lam, 0.0), 1.0) ** (1.0 / d)
    cut = [math.floor(length * ratio) for length in sizes]  # truncated as timm does
    u = torch.rand((1, d), generator=generator, device=device, dtype=torch.float64).tolist()[0]
    centre = [int(ui * length) for ui, length in zip(u, sizes, strict=True)]  # uniform in [0, L)
    lo = [max(c - k // 2, 0) for c, k in zip(centre, cut, strict=True)]
    hi = [min(c + (k + 1) // 2, length) for c, k, length in zip(centre, cut, sizes, strict=True)]
    return Box(torch.tensor([lo], device=device), torch.tensor([hi], device=device))


def cutmix(
    inputs: Tensor,
    targets: Tensor,
    box: Box,
    index: Tensor,
    *,
    dims: Sequence[int] | int | Layout | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix of a batch: paste the box of ``inputs[index]`` into ``inputs``; mix targets by the area kept.

    Args:
        inputs: ``(N, C, H, W)``, ``(N, T)``, ``(N, T, D)``, or 5-D with ``dims``; any dtype (no arithmetic
            touches the inputs, so integer images are exact).
        targets: probabilities ``(N, K)``.
        box: from :func:`sample_box`: one box for the batch or one per sample.
        index: the partner of each sample ``(N,)``.
        dims: the axes the box covers, or a layout (``"NCHW"``, ``"NT"``, ``"NTD"``, ``"NCDHW"``, ``"NTCHW"``).
        out: a tensor like ``inputs`` that receives the mixed inputs, or ``inputs`` itself to paste in place.

    Returns:
        ``(mixed_inputs, mixed_targets, kept)``: ``kept`` ``(N,)``, in the targets' dtype, is the fraction of each
        sample kept after the box is clipped at the borders, the weight of its own target.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> x[1] = 1.0
        >>> box = Box(torch.tensor([[0, 0]]), torch.tensor([[2, 4]]))
        >>> out, y, kept = cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))
        >>> kept.tolist(), out[0, 0, :, 0].tolist(), y[0].tolist()
        ([0.5, 0.5], [1.0, 1.0, 0.0, 0.0], [0.5, 0.5])
    """
    check_index(inputs, index)
    check_mix_targets(inputs, targets)
    axes = resolve_dims(inputs, dims)
    n = inputs.shape[0]
    check_box(box.lo, box.hi, n, len(axes))
    if out is not None:
        check_out(out, inputs)
    mixed = paste(inputs, box.lo, box.hi, index, cyclic_shift(index), axes, out=out)
    kept = kept_fraction(box.lo, box.hi, [inputs.shape[d] for d in axes]).to(targets.device, targets.dtype)
    kept = kept.expand(n).clone() if kept.shape[0] != n else kept
    return mixed, mix_targets(targets, kept, index), kept
