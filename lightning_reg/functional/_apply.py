"""The deterministic kernels behind ``mixup`` and ``cutmix``, for draws trusted as drawn (what the callbacks call).

The public functions check their arguments first.

Speed: a pairing that is a cyclic shift of the batch (``index[i] == (i + k) % N``) is applied without gathering the
partners: they are two contiguous runs of the batch, so a blend is one ``torch.lerp`` pass. Any other pairing is
gathered first (one copy of the batch). Both give bit-identical results. ``out`` receives the result; ``out`` that
is ``inputs`` itself overwrites the inputs (then the partners are always gathered first, into ``scratch`` if given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_reg.functional._checks import check_inputs, tracks_grad

Runs = list[tuple[slice, slice]]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``; a CPU tensor goes to a CUDA device through pinned memory with ``non_blocking=True``.

    A pageable host-to-device copy blocks the host until the stream has drained; a pinned one is queued like a
    kernel. Torch's caching host allocator keeps the pinned block alive until the copy is done, so the draw on
    the host side may be dropped at once. The values are the ones drawn on the host, so results (and a resumed
    run) do not depend on the device.

    Example:
        >>> to_device(torch.arange(3), "cpu").tolist()
        [0, 1, 2]
    """
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and torch.cuda.is_available():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def broadcast_lam(lam: float | Tensor, like: Tensor) -> float | Tensor:
    """``lam`` shaped ``(N, 1, ..., 1)`` in ``like``'s dtype and device, so it broadcasts over a sample."""
    if not isinstance(lam, Tensor):
        return float(lam)
    return lam.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def mix_targets(targets: Tensor, lam: float | Tensor, index: Tensor) -> Tensor:
    """``lam * targets + (1 - lam) * targets[index]`` as a new tensor (rows still sum to 1).

    Example:
        >>> mix_targets(torch.eye(2), 0.75, torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    index = index.to(targets.device)
    # The gathered partner rows are a fresh tensor: blend into them (partner + lam * (x - partner)).
    return targets[index].lerp_(targets, broadcast_lam(lam, targets))


def _runs(n: int, shift: int | None) -> Runs:
    """Rows ``[0, N-k)`` pair with rows ``[k, N)``, rows ``[N-k, N)`` with ``[0, k)``: two contiguous runs."""
    return [] if shift is None else [(slice(0, n - shift), slice(shift, n)), (slice(n - shift, n), slice(0, shift))]


def blend(
    inputs: Tensor,
    lam: float | Tensor,
    index: Tensor,
    shift: int | None = None,
    *,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """MixUp of the inputs, ``lerp(inputs[index], inputs, lam)``; ``shift`` is ``k`` when ``index`` is a roll by ``k``.

    Integer inputs (``uint8`` images) are blended in float32 and rounded back (half to even), as timm's
    ``FastCollateMixup`` does. ``scratch`` (like ``inputs``) receives the gathered partners when ``out`` is
    ``inputs``, so that mixing in place allocates nothing.

    Example:
        >>> blend(torch.tensor([[0.0], [10.0]]), 0.75, torch.tensor([1, 0]))
        tensor([[2.5000],
                [7.5000]])
    """
    check_inputs(inputs)
    inplace = out is inputs
    if not torch.is_floating_point(inputs):
        index = index.to(inputs.device)
        blended = torch.lerp(inputs.float(), inputs[index].float(), 1.0 - broadcast_lam(lam, inputs.float()))
        blended = blended.round_().to(inputs.dtype)
        return out.copy_(blended) if out is not None else blended
    weight = broadcast_lam(lam, inputs)
    # `out=` kernels do not record autograd history: inputs that need a graph take the gather path.
    runs = [] if inplace or tracks_grad(inputs) else _runs(inputs.shape[0], shift)
    if runs:
        mixed = out if out is not None else torch.empty_like(inputs)
        for rows, partners in runs:
            w = weight[rows] if isinstance(weight, Tensor) else weight
            torch.lerp(inputs[partners], inputs[rows], w, out=mixed[rows])
        return mixed
    index = index.to(inputs.device)
    if inplace:
        partner = torch.index_select(inputs, 0, index, out=scratch) if scratch is not None else inputs[index]
        return inputs.lerp_(partner, 1.0 - weight)  # x + (1 - lam) * (partner - x)
    # Gather the partners (into `out` when given), then blend the inputs into them: partner + lam * (x - partner).
    partner = torch.index_select(inputs, 0, index, out=out) if out is not None else inputs[index]
    return partner.lerp_(inputs, weight)


def _shape_along(n: int, ndim: int, dim: int, length: int) -> list[int]:
    shape = [n] + [1] * (ndim - 1)
    shape[dim] = length
    return shape


def box_mask(lo: Tensor, hi: Tensor, axes: Sequence[int], shape: Sequence[int], device: torch.device) -> Tensor:
    """Boolean ``(N, 1.., L_d, ..)``: inside each sample's box ``[lo, hi)``, broadcastable to ``shape``.

    Example:
        >>> box_mask(torch.tensor([[1], [0]]), torch.tensor([[3], [1]]), (1,), (2, 4), torch.device("cpu")).int()
        tensor([[0, 1, 1, 0],
                [1, 0, 0, 0]], dtype=torch.int32)
    """
    n, ndim = shape[0], len(shape)
    lo, hi = lo.to(device), hi.to(device)
    mask: Tensor | None = None
    for j, d in enumerate(axes):
        pos = torch.arange(shape[d], device=device)
        inside = (pos >= lo[:, j : j + 1]) & (pos < hi[:, j : j + 1])  # (N, L_d)
        inside = inside.view(_shape_along(n, ndim, d, shape[d]))
        mask = inside if mask is None else mask & inside
    if mask is None:
        raise ValueError("Expected at least one axis to cut along.")
    return mask


def paste(
    inputs: Tensor,
    lo: Tensor,
    hi: Tensor,
    index: Tensor,
    shift: int | None,
    axes: Sequence[int],
    *,
    out: Tensor | None = None,
) -> Tensor:
    """CutMix of the inputs: the box ``[lo, hi)`` along ``axes`` of ``inputs[index]`` pasted into ``inputs``.

    One box ``(1, d)`` or one per sample ``(N, d)``. No arithmetic touches the values, so every dtype is exact.

    Example:
        >>> x, lo, hi = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0]]), torch.tensor([[1]])
        >>> paste(x, lo, hi, torch.tensor([1, 0]), 1, (1,))
        tensor([[3, 2],
                [1, 4]])
    """
    check_inputs(inputs)
    n = inputs.shape[0]
    inplace, grad = out is inputs, tracks_grad(inputs)  # `out=` kernels record no autograd history
    runs = [] if inplace or grad else _runs(n, shift)
    index = index.to(inputs.device)
    if lo.shape[0] == 1:
        # One box for the batch: copy the batch, then paste only the box region of the partners.
        mixed = inputs if inplace else (out.copy_(inputs) if out is not None else inputs.clone())
        region: list[slice] = [slice(None)] * inputs.ndim
        for d, low, high in zip(axes, lo[0].tolist(), hi[0].tolist(), strict=True):
            region[d] = slice(low, high)
        if runs:
            for rows, partners in runs:
                mixed[tuple([rows, *region[1:]])] = inputs[tuple([partners, *region[1:]])]
        else:
            mixed[tuple(region)] = inputs[tuple(region)][index]
        return mixed
    mask = box_mask(lo, hi, axes, inputs.shape, inputs.device)
    if runs:
        mixed = out if out is not None else torch.empty_like(inputs)
        for rows, partners in runs:
            torch.where(mask[rows], inputs[partners], inputs[rows], out=mixed[rows])
        return mixed
    if grad:
        return torch.where(mask, inputs[index], inputs)
    if inplace:
        return torch.where(mask, inputs[index], inputs, out=inputs)
    # Gather the partners (into `out` when given), then keep the inputs outside the boxes.
    partner = torch.index_select(inputs, 0, index, out=out) if out is not None else inputs[index]
    return torch.where(mask, partner, inputs, out=partner)


def kept_fraction(lo: Tensor, hi: Tensor, sizes: Sequence[int]) -> Tensor:
    """The fraction of each sample kept outside its box: ``1 - volume(box) / volume(sample)``, float64 ``(B,)``.

    Example:
        >>> kept_fraction(torch.tensor([[0, 0]]), torch.tensor([[2, 4]]), (4, 4))
        tensor([0.5000], dtype=torch.float64)
    """
    volume = (hi - lo).clamp(min=0).prod(dim=1).to(torch.float64)
    return 1.0 - volume / math.prod(sizes)


def kept_one(lows: list[int], highs: list[int], sizes: Sequence[int]) -> float:
    """:func:`kept_fraction` of one box given as Python ints: the same float64 arithmetic, no tensor ops."""
    volume = math.prod(max(high - low, 0) for low, high in zip(lows, highs, strict=True))
    return 1.0 - float(volume) / math.prod(sizes)


def mix_elementwise(
    inputs: Tensor,
    index: Tensor,
    weight: Tensor,
    lo: Tensor,
    hi: Tensor,
    axes: Sequence[int],
    *,
    out: Tensor | None = None,
    shift: int | None = None,
) -> Tensor:
    """MixUp and CutMix chosen per sample (timm's ``mode="elem"``/``"pair"``), in one pass over the batch.

    Sample ``i`` becomes ``lerp(x[index[i]], x[i], weight[i])`` (MixUp; ``weight`` 1 leaves it as it is) with its
    box ``[lo[i], hi[i])`` pasted from the *original* ``x[index[i]]`` (CutMix; an empty box pastes nothing).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
        >>> lo, hi = torch.tensor([[0], [0]]), torch.tensor([[0], [1]])  # no box for sample 0, one step for 1
        >>> mix_elementwise(x, torch.tensor([1, 0]), torch.tensor([0.75, 1.0]), lo, hi, (1,))
        tensor([[1., 1.],
                [0., 4.]])
    """
    check_inputs(inputs)
    n = inputs.shape[0]
    if lo.shape != (n, len(axes)) or hi.shape != (n, len(axes)):
        raise ValueError(
            f"Expected per-sample boxes with `lo`/`hi` of shape ({n}, {len(axes)}), but got {tuple(lo.shape)} "
            f"and {tuple(hi.shape)}."
        )
    index = index.to(inputs.device)
    blended = blend(inputs, weight, index, shift, out=out)
    mask = box_mask(lo, hi, axes, inputs.shape, inputs.device)
    if tracks_grad(inputs):
        return torch.where(mask, inputs[index], blended)
    if shift is None:
        return torch.where(mask, inputs[index], blended, out=blended)
    for rows, partners in _runs(n, shift):  # boxes from the original partners, two contiguous runs: no gather
        torch.where(mask[rows], inputs[partners], blended[rows], out=blended[rows])
    return blended
