"""CutMix (Yun et al., 2019, https://arxiv.org/abs/1905.04899): paste a box from the partner sample.

The box covers the last two dims of images ``(N, C, H, W)`` and the time axis (dim 1) of sequences ``(N, T)`` /
``(N, T, D)``; ``dims`` chooses others, as axes or as a layout string (:data:`Layout`). A 5-D input is either a
volume ``(N, C, D, H, W)`` (cut along ``D, H, W``) or a video ``(N, T, C, H, W)`` (cut along every frame's
``H, W``, as torchvision does): the two cannot be told apart from the shape, so 5-D inputs need ``dims=``.

:func:`sample_box` draws the box (timm's ``rand_bbox``: side ``L * (1 - lam) ** (1 / d)``, a uniform centre,
clipped at the borders; or timm's ``rand_bbox_minmax`` with ``minmax``) from a ``torch.Generator``;
:func:`cutmix` applies it and returns the fraction actually kept, with which the targets are mixed. With a
``(N,)`` tensor ``lam`` every sample gets its own box, applied with one broadcast mask (no loop over samples).

As in :mod:`~lightning_reg.functional.mixup`, a pairing that is a cyclic shift of the batch is applied from two
contiguous runs of the batch, without gathering the partners.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lightning_reg.functional.mixup import (
    MixingParams,
    check_inputs,
    check_inputs_args,
    check_mix_args,
    check_out,
    cyclic_shift,
    mix_targets,
    tracks_grad,
)

__all__ = [
    "Box",
    "Layout",
    "apply_cutmix",
    "box_lam",
    "cutmix",
    "cutmix_inputs",
    "default_dims",
    "layout_dims",
    "mix_elementwise",
    "sample_box",
    "sample_cutmix_box",
]

#: Named input layouts for ``dims=``: the batch dim ``N`` first; the box covers the spatial or time axes.
Layout = Literal["NT", "NTD", "NCHW", "NCDHW", "NTCHW"]
_LAYOUT_DIMS: dict[str, tuple[int, ...]] = {
    "NT": (1,),  # a sequence of tokens or values: a span of time steps
    "NTD": (1,),  # a sequence of feature vectors: a span of time steps, all features
    "NCHW": (2, 3),  # images
    "NCDHW": (2, 3, 4),  # volumes: a box in depth, height and width
    "NTCHW": (3, 4),  # videos: the same box in every frame, all channels (torchvision's CutMix on videos)
}


class Box(NamedTuple):
    """Half-open boxes ``[lo, hi)`` along the mixed dims.

    Attributes:
        lo: int64 ``(B, d)``: the first index of the box along each of the ``d`` dims; ``B`` is 1 (one box
            for the batch) or ``N`` (one per sample).
        hi: int64 ``(B, d)``: one past the last index.

    Example:
        >>> import torch
        >>> box = Box(lo=torch.tensor([[0, 0]]), hi=torch.tensor([[2, 4]]))  # rows 0-1, columns 0-3
        >>> box_lam(box, (4, 4)).tolist()  # the share of the image kept from the original sample
        [0.5]
    """

    lo: Tensor
    hi: Tensor


def default_dims(ndim: int) -> tuple[int, ...]:
    """The dims CutMix cuts along for an input of ``ndim`` dims (batch dim included).

    Example:
        >>> default_dims(4), default_dims(2), default_dims(3)
        ((2, 3), (1,), (1,))
    """
    if ndim == 5:
        raise ValueError(
            "CutMix cannot tell the layout of a 5-D input: a volume (N, C, D, H, W) is cut along D, H and W "
            "(`dims='NCDHW'`, i.e. (2, 3, 4)), a video (N, T, C, H, W) along every frame's H and W, as torchvision "
            "does (`dims='NTCHW'`, i.e. (3, 4)). Pass `dims=` saying which."
        )
    table = {2: (1,), 3: (1,), 4: (2, 3)}
    if ndim not in table:
        raise ValueError(
            f"CutMix has no default dims for inputs with {ndim} dims; expected sequences (N, T) or (N, T, D), "
            "images (N, C, H, W), or 5-D inputs with `dims=`. Pass `dims=` naming the axes to cut along."
        )
    return table[ndim]


def layout_dims(layout: str, ndim: int | None = None) -> tuple[int, ...]:
    """The axes CutMix cuts along for a named :data:`Layout`, checked against the input's ``ndim`` when given.

    Example:
        >>> layout_dims("NTCHW"), layout_dims("NCDHW")
        ((3, 4), (2, 3, 4))
    """
    if layout not in _LAYOUT_DIMS:
        raise ValueError(f"Expected a layout `dims` to be one of {list(get_args(Layout))}, but got {layout!r}.")
    if ndim is not None and ndim != len(layout):
        raise ValueError(f"`dims={layout!r}` names {len(layout)} dims, but the inputs have {ndim}.")
    return _LAYOUT_DIMS[layout]


def check_dims(dims: object) -> Sequence[int] | int | str | None:
    """Return ``dims`` if it is ``None``, an axis, a sequence of axes or a :data:`Layout`; else raise."""
    if dims is None or isinstance(dims, str):
        if isinstance(dims, str):
            layout_dims(dims)
        return dims
    if isinstance(dims, int) and not isinstance(dims, bool):
        return dims
    if isinstance(dims, Sequence) and len(dims) > 0 and all(type(d) is int for d in dims):
        return tuple(dims)
    raise ValueError(f"Expected `dims` as axes (ints) or a layout in {list(get_args(Layout))}, but got {dims!r}.")


def _resolve_dims(inputs: Tensor, dims: Sequence[int] | int | str | None) -> tuple[int, ...]:
    if dims is None:
        return default_dims(inputs.ndim)
    if isinstance(dims, str):
        return layout_dims(dims, inputs.ndim)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    resolved = tuple(d % inputs.ndim if -inputs.ndim <= d < inputs.ndim else -1 for d in dims)
    if len(resolved) == 0 or any(d < 1 for d in resolved) or len(set(resolved)) != len(resolved):
        raise ValueError(
            f"Expected `dims` to be distinct non-batch axes of an input with {inputs.ndim} dims, but got {dims!r}."
        )
    return tuple(sorted(resolved))


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
    device = generator.device if generator is not None else torch.device("cpu")
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
    upper = length.long()
    lo = (centre - cut // 2).clamp(min=0)
    hi = torch.minimum(centre + (cut + 1) // 2, upper)
    return Box(lo, hi)


def check_minmax(minmax: object) -> tuple[float, float]:
    """Return ``minmax`` as two floats ``0 < lo < hi <= 1``, else raise (timm's ``cutmix_minmax``)."""
    values: tuple[object, ...] = ()
    if isinstance(minmax, Sequence) and not isinstance(minmax, str):
        values = tuple(minmax)
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"Expected `cutmix_minmax` as two floats (lo, hi), side fractions, but got {minmax!r}.")
    lo, hi = float(values[0]), float(values[1])  # type: ignore[arg-type]
    if not 0.0 < lo < hi <= 1.0:
        raise ValueError(f"Expected `cutmix_minmax` (lo, hi) with 0 < lo < hi <= 1, but got {minmax!r}.")
    return lo, hi


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


def box_lam(box: Box, sizes: Sequence[int]) -> Tensor:
    """The fraction of each sample kept outside its box: ``1 - volume(box) / volume(sample)``, ``(B,)``.

    Example:
        >>> box_lam(Box(torch.tensor([[0, 0]]), torch.tensor([[2, 4]])), (4, 4))
        tensor([0.5000], dtype=torch.float64)
    """
    volume = (box.hi - box.lo).clamp(min=0).prod(dim=1).to(torch.float64)
    return 1.0 - volume / math.prod(sizes)


def _kept_one(lows: list[int], highs: list[int], sizes: Sequence[int]) -> float:
    """:func:`box_lam` of one box given as Python ints: the same float64 arithmetic, no tensor ops."""
    volume = math.prod(max(high - low, 0) for low, high in zip(lows, highs, strict=True))
    return 1.0 - float(volume) / math.prod(sizes)


def sample_cutmix_box(
    inputs: Tensor,
    lam: float | Tensor,
    *,
    generator: torch.Generator | None = None,
    dims: Sequence[int] | int | str | None = None,
    minmax: tuple[float, float] | None = None,
) -> tuple[Box, float | Tensor]:
    """Draw the box :func:`cutmix` would draw for ``inputs``, and the fraction it keeps.

    Lets a caller mix the targets (with the returned fraction) before pasting the box with
    ``cutmix(..., box=box)``: the same draws as ``cutmix(..., generator=generator)``. ``minmax`` as in
    :func:`sample_box`.

    Returns:
        ``(box, kept_lam)``: a float for one box, a float32 ``(N,)`` tensor for per-sample boxes.

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> box, kept = sample_cutmix_box(x, 0.75, generator=torch.Generator().manual_seed(0))
        >>> box.lo.shape, 0.0 <= kept <= 1.0
        (torch.Size([1, 2]), True)
    """
    check_inputs(inputs)
    sizes = [inputs.shape[d] for d in _resolve_dims(inputs, dims)]
    box = sample_box(lam, sizes, generator=generator, minmax=minmax)
    if box.lo.shape[0] == 1 and not isinstance(lam, Tensor):
        return box, _kept_one(box.lo[0].tolist(), box.hi[0].tolist(), sizes)
    return box, box_lam(box, sizes).to(torch.float32)


def _shape_along(n: int, ndim: int, dim: int, length: int) -> list[int]:
    shape = [n] + [1] * (ndim - 1)
    shape[dim] = length
    return shape


def box_mask(box: Box, axes: Sequence[int], shape: Sequence[int], device: torch.device) -> Tensor:
    """Boolean ``(N, 1.., L_d, ..)``: inside each sample's box, broadcastable to ``shape`` (no loop over samples).

    Example:
        >>> box = Box(torch.tensor([[1], [0]]), torch.tensor([[3], [1]]))
        >>> box_mask(box, (1,), (2, 4), torch.device("cpu")).int().tolist()
        [[0, 1, 1, 0], [1, 0, 0, 0]]
    """
    n, ndim = shape[0], len(shape)
    lo, hi = box.lo.to(device), box.hi.to(device)
    mask: Tensor | None = None
    for j, d in enumerate(axes):
        pos = torch.arange(shape[d], device=device)
        inside = (pos >= lo[:, j : j + 1]) & (pos < hi[:, j : j + 1])  # (N, L_d)
        inside = inside.view(_shape_along(n, ndim, d, shape[d]))
        mask = inside if mask is None else mask & inside
    if mask is None:
        raise ValueError("Expected at least one axis to cut along.")
    return mask


def mix_elementwise(
    inputs: Tensor,
    index: Tensor,
    weight: Tensor,
    box: Box,
    *,
    dims: Sequence[int] | int | str | None = None,
    out: Tensor | None = None,
    shift: int | None = None,
) -> Tensor:
    """MixUp and CutMix chosen per sample (timm's ``mode="elem"``/``"pair"``), in one pass over the batch.

    Sample ``i`` becomes ``lerp(x[index[i]], x[i], weight[i])`` (MixUp; ``weight`` 1 leaves it as it is) with its
    box pasted from the *original* ``x[index[i]]`` (CutMix; an empty box pastes nothing). A sample is mixed by
    MixUp with ``weight < 1`` and an empty box, by CutMix with ``weight == 1`` and a box, not at all with both.

    Args:
        inputs: ``(N, ...)`` floating or integer (integer inputs are blended in float32 and rounded back).
        index: the partner of each sample ``(N,)``.
        weight: ``(N,)`` MixUp weight of the sample itself, in the inputs' dtype for floating inputs.
        box: per-sample boxes ``(N, d)``.
        dims: the axes of the boxes, as in :func:`cutmix`.
        out: optional tensor like ``inputs`` (not sharing its memory) that receives the result.
        shift: ``k`` when ``index`` is the cyclic shift ``(i + k) % N``: the partners are then read as two
            contiguous runs of the batch, without a gather.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
        >>> box = Box(torch.tensor([[0], [0]]), torch.tensor([[0], [1]]))  # no box for sample 0, one step for 1
        >>> mix_elementwise(x, torch.tensor([1, 0]), torch.tensor([0.75, 1.0]), box)
        tensor([[1., 1.],
                [0., 4.]])
    """
    from lightning_reg.functional.mixup import apply_mixup

    check_inputs(inputs)
    axes = _resolve_dims(inputs, dims)
    n = inputs.shape[0]
    if box.lo.shape != (n, len(axes)) or box.hi.shape != (n, len(axes)):
        raise ValueError(
            f"Expected per-sample boxes with `lo`/`hi` of shape ({n}, {len(axes)}), but got {tuple(box.lo.shape)} "
            f"and {tuple(box.hi.shape)}."
        )
    index = index.to(inputs.device)
    blended = apply_mixup(inputs, MixingParams(weight, index, shift), out=out)
    mask = box_mask(box, axes, inputs.shape, inputs.device)
    if tracks_grad(inputs):
        return torch.where(mask, inputs[index], blended)
    if shift is None:
        return torch.where(mask, inputs[index], blended, out=blended)
    # Rows [0, N-k) take their boxes from rows [k, N), rows [N-k, N) from rows [0, k): no gather.
    for rows, partners in ((slice(0, n - shift), slice(shift, n)), (slice(n - shift, n), slice(0, shift))):
        torch.where(mask[rows], inputs[partners], blended[rows], out=blended[rows])
    return blended


def cutmix(
    inputs: Tensor,
    targets: Tensor,
    lam: float | Tensor,
    index: Tensor,
    *,
    generator: torch.Generator | None = None,
    box: Box | None = None,
    dims: Sequence[int] | int | str | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
    correct_lam: bool = True,
) -> tuple[Tensor, Tensor, float | Tensor]:
    """CutMix of a batch: paste the box of ``inputs[index]`` into ``inputs``; mix targets by the area kept.

    Args:
        inputs: ``(N, C, H, W)``, ``(N, C, D, H, W)``, ``(N, T)`` or ``(N, T, D)``, any dtype (no arithmetic
            touches the inputs, so integer images are exact).
        targets: probabilities ``(N, K)``.
        lam: the target share of the original sample: a float (one box for the batch) or ``(N,)`` (a box per
            sample).
        index: the partner of each sample ``(N,)``.
        generator: draws the box when ``box`` is not given.
        box: a box from :func:`sample_box`, to apply a fixed box.
        dims: the axes to cut along; see :func:`default_dims`.
        inplace: paste into ``inputs`` itself instead of a copy.
        out: optional tensor like ``inputs`` (not sharing its memory) that receives the result, so
            that repeated calls allocate nothing.
        correct_lam: mix the targets by the fraction actually kept after the box is clipped at the borders
            (default, timm's ``correct_lam=True``); ``False`` mixes them by ``lam`` as drawn.

    Returns:
        ``(mixed_inputs, mixed_targets, lam)`` where ``lam`` is the weight the targets were mixed with: the
        fraction actually kept after clipping (a float, or a float32 ``(N,)`` tensor for per-sample boxes), or
        ``lam`` itself with ``correct_lam=False``.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> x[1] = 1.0
        >>> box = Box(torch.tensor([[0, 0]]), torch.tensor([[2, 4]]))
        >>> out, y, kept = cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box)
        >>> kept, out[0, 0, :, 0].tolist(), y[0].tolist()
        (0.5, [1.0, 1.0, 0.0, 0.0], [0.5, 0.5])
    """
    check_mix_args(inputs, targets, lam, index)
    mixed, kept_lam = cutmix_inputs(
        inputs, lam, index, generator=generator, box=box, dims=dims, inplace=inplace, out=out
    )
    if not correct_lam:
        kept_lam = lam.to(torch.float32) if isinstance(lam, Tensor) else float(lam)
    return mixed, mix_targets(targets, kept_lam, index), kept_lam


def cutmix_inputs(
    inputs: Tensor,
    lam: float | Tensor,
    index: Tensor,
    *,
    generator: torch.Generator | None = None,
    box: Box | None = None,
    dims: Sequence[int] | int | str | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, float | Tensor]:
    """The input half of :func:`cutmix`: ``(mixed_inputs, kept_lam)``; mix the targets with ``kept_lam``.

    Example:
        >>> box = Box(torch.tensor([[0]]), torch.tensor([[1]]))
        >>> cutmix_inputs(torch.tensor([[1, 2], [3, 4]]), 0.5, torch.tensor([1, 0]), box=box)
        (tensor([[3, 2],
                [1, 4]]), 0.5)
    """
    check_inputs_args(inputs, lam, index)
    params = MixingParams(lam, index, cyclic_shift(index))
    return apply_cutmix(inputs, params, generator=generator, box=box, dims=dims, inplace=inplace, out=out)


def apply_cutmix(
    inputs: Tensor,
    params: MixingParams,
    *,
    generator: torch.Generator | None = None,
    box: Box | None = None,
    dims: Sequence[int] | int | str | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, float | Tensor]:
    """:func:`cutmix_inputs` for a draw of ``sample_mixup``, trusted as drawn (what the callbacks call).

    ``params.lam`` and ``params.index`` are not checked again and ``params.shift`` says whether the pairing is a
    cyclic shift; ``inputs``, ``dims``, ``box`` and ``out`` are checked. Same results as :func:`cutmix_inputs`.

    Example:
        >>> from lightning_reg.functional.mixup import sample_mixup
        >>> params = sample_mixup(2, 1.0, generator=torch.Generator().manual_seed(0))
        >>> x = torch.arange(8.0).view(2, 1, 2, 2)
        >>> a = apply_cutmix(x, params, generator=torch.Generator().manual_seed(1))
        >>> b = cutmix_inputs(x, params.lam, params.index, generator=torch.Generator().manual_seed(1))
        >>> torch.equal(a[0], b[0]) and a[1] == b[1]
        True
    """
    check_inputs(inputs)
    lam, index = params.lam, params.index
    axes = _resolve_dims(inputs, dims)
    sizes = [inputs.shape[d] for d in axes]
    n = inputs.shape[0]
    if box is None:
        box = sample_box(lam, sizes, generator=generator)
    if (
        box.lo.ndim != 2
        or box.lo.shape != box.hi.shape
        or box.lo.shape[1] != len(axes)
        or box.lo.shape[0] not in (1, n)
    ):
        raise ValueError(
            f"Expected a box with `lo`/`hi` of shape (1, {len(axes)}) or ({n}, {len(axes)}), but got "
            f"{tuple(box.lo.shape)} and {tuple(box.hi.shape)}. Draw it with `sample_box(lam, sizes)`."
        )
    if out is not None:
        if inplace:
            raise ValueError("Pass either `inplace=True` or `out=`, not both.")
        check_out(out, inputs)
    # Partner rows: with a cyclic shift k, rows [0, N-k) pair with [k, N) and rows [N-k, N) with [0, k).
    grad = tracks_grad(inputs)  # `out=` kernels record no autograd history: then plain ops only
    shift = None if inplace or grad else params.shift
    runs = [(slice(0, n - shift), slice(shift, n)), (slice(n - shift, n), slice(0, shift))] if shift is not None else []
    index = index.to(inputs.device)
    if box.lo.shape[0] == 1:
        # One box for the batch: copy the batch, then paste only the box region of the partners.
        mixed = inputs if inplace else (out.copy_(inputs) if out is not None else inputs.clone())
        region: list[slice] = [slice(None)] * inputs.ndim
        lows, highs = box.lo[0].tolist(), box.hi[0].tolist()
        for d, low, high in zip(axes, lows, highs, strict=True):
            region[d] = slice(low, high)
        if runs:
            for rows, partners in runs:
                mixed[tuple([rows, *region[1:]])] = inputs[tuple([partners, *region[1:]])]
        else:
            mixed[tuple(region)] = inputs[tuple(region)][index]
        kept_lam: float | Tensor = _kept_one(lows, highs, sizes)
    else:
        mask = box_mask(box, axes, inputs.shape, inputs.device)
        if runs:
            mixed = out if out is not None else torch.empty_like(inputs)
            for rows, partners in runs:
                torch.where(mask[rows], inputs[partners], inputs[rows], out=mixed[rows])
        elif grad:
            mixed = torch.where(mask, inputs[index], inputs)
        elif inplace:
            mixed = torch.where(mask, inputs[index], inputs, out=inputs)
        else:
            # Gather the partners (into `out` when given), then keep the inputs outside the boxes.
            partner = torch.index_select(inputs, 0, index, out=out) if out is not None else inputs[index]
            mixed = torch.where(mask, partner, inputs, out=partner)
        kept_lam = box_lam(box, sizes).to(torch.float32)
    return mixed, kept_lam
