"""Label smoothing (Szegedy et al., 2016, https://arxiv.org/abs/1512.00567) and one-hot targets.

The convention is PyTorch's (``F.cross_entropy(..., label_smoothing=s)``): a target distribution ``p``
becomes ``(1 - s) * p + s / K``, so the true class keeps ``1 - s + s / K`` and every class gets ``s / K``.
Smoothing is linear, so it commutes with mixing: smoothing then mixing equals mixing then smoothing.

Multi-label (multi-hot) targets ``(N, K)`` whose entries are independent binary labels are smoothed per entry
towards 1/2, ``(1 - s) * y + s / 2`` (timm's ``mixup_target(..., multi_label=True)``), with ``multi_label=True``.

Label range without a host sync: on the CPU the scatter that builds the rows checks every index itself, and a
failure is re-raised with a message that says how to fix it. On an accelerator, reading the range back
(``aminmax`` + ``int``) would stall the stream on every batch: ``validate=False`` skips it and leaves out-of-range
labels to the device kernel's own bounds assertion, as ``F.cross_entropy`` does; the callbacks validate on the
first training batch of every epoch and pass ``validate=False`` on the others.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

__all__ = ["check_range", "check_rows", "check_targets", "mixed_one_hot", "one_hot", "smooth"]


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
    if targets.ndim >= 3 or (targets.ndim == 2 and integer and targets.shape[1] > 1):
        raise ValueError(
            f"Expected `{name}` with one label per sample: class indices (N,) or per-class rows (N, K) (probabilities, "
            f"or multi-hot rows with `multi_label=True`), but got shape {tuple(targets.shape)} and dtype "
            f"{targets.dtype}. Dense targets such as segmentation masks (N, H, W) are not supported: mixing and "
            "smoothing here act on one label distribution per sample."
        )
    raise ValueError(
        f"Expected `{name}` as class indices of shape (N,) with an integer dtype or probabilities of shape (N, K) "
        f"with a float dtype, but got shape {tuple(targets.shape)} and dtype {targets.dtype}. "
        "Squeeze (N, 1) targets to (N,), cast float indices with `.long()`, or pass one-hot rows as float."
    )


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even) as torch rounds a float64 scalar."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def check_range(targets: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless every class index lies in ``[0, num_classes)`` (reads the range: a host sync)."""
    if targets.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(targets))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"Expected class indices in [0, {num_classes}), but got values in [{low}, {high}]. "
                "Pass the right `num_classes`, or remap the labels to 0..num_classes-1."
            )


def check_rows(targets: Tensor, *, multi_label: bool = False, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless float targets ``(N, K)`` are distributions (or multi-hot with ``multi_label``).

    Reads the values back (a host sync): the callbacks call it once per epoch, not per batch.

    Example:
        >>> check_rows(torch.tensor([[0.2, 0.8]]))
        >>> check_rows(torch.tensor([[1.0, 1.0]]), multi_label=True)
    """
    if targets.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(targets))
    if low < -atol or high > 1 + atol:
        raise ValueError(
            f"Expected probability targets with entries in [0, 1], but got values in [{low:.4g}, {high:.4g}]. "
            "Pass probabilities (apply softmax to logits), or class indices as an integer tensor (N,)."
        )
    if multi_label:
        return
    sums = targets.sum(dim=1, dtype=torch.float64)
    worst = float((sums - 1).abs().max())
    if worst > atol:
        raise ValueError(
            f"Expected probability targets (N, K) whose rows sum to 1, but a row sums to {float(sums.max()):.4g} "
            f"(rows sum to [{float(sums.min()):.4g}, {float(sums.max()):.4g}]). Multi-hot (multi-label) targets "
            "need `multi_label=True`: each entry is then an independent binary label, smoothed towards 1/2."
        )


def _check_smoothing(smoothing: float) -> None:
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"Expected `smoothing` to be a float in [0, 1), but got {smoothing!r}.")


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
    _check_smoothing(smoothing)
    if smoothing == 0:
        return probs
    return probs * (1.0 - smoothing) + smoothing / (2 if multi_label else probs.shape[-1])


def _target_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of built probability rows: ``dtype``, else torch's default float dtype (float32 unless changed)."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Expected `dtype` to be a floating torch.dtype or None, but got {dtype!r}.")
    return dtype


def _scatter(out: Tensor, index: Tensor, src: Tensor | float, num_classes: int, labels: Tensor, add: bool) -> Tensor:
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

    Probability targets ``(N, K)`` pass through (smoothed if asked), so callers need not know which
    kind they hold. Built rows have torch's default float dtype (``float32`` unless changed) or ``dtype``;
    probability targets keep theirs.

    Args:
        targets: class indices ``(N,)`` (integer dtype) or probabilities ``(N, K)`` (float dtype).
        num_classes: the number of classes ``K``.
        smoothing: label smoothing in ``[0, 1)``, PyTorch's convention ``(1 - s) * p + s / K``.
        multi_label: the targets are multi-hot rows ``(N, K)`` of independent binary labels: smoothed per entry
            (see :func:`smooth`).
        validate: check the label range on accelerators too (a host sync; see the module notes). On the CPU the
            range is always checked, at no extra cost.
        dtype: the dtype of rows built from indices.

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
    _check_num_classes(num_classes)
    _check_smoothing(smoothing)
    targets = check_targets(targets)
    if targets.ndim == 2:
        _check_columns(targets, num_classes)
        return smooth(targets, smoothing, multi_label=multi_label)
    if multi_label:
        raise ValueError(_MULTI_LABEL_INDICES.format(shape=tuple(targets.shape)))
    if validate and targets.device.type != "cpu":
        check_range(targets, num_classes)
    # One pass: fill the off-value s/K, scatter the on-value 1 - s + s/K (timm's `mixup_target` convention).
    probs = torch.full(
        (targets.shape[0], num_classes), smoothing / num_classes, device=targets.device, dtype=_target_dtype(dtype)
    )
    on = 1.0 - smoothing + smoothing / num_classes
    return _scatter(probs, targets.long()[:, None], on, num_classes, targets, add=False)


_MULTI_LABEL_INDICES = (
    "`multi_label=True` expects multi-hot float rows (N, K), but got class indices of shape {shape}. Build the "
    "multi-hot rows in the dataset, or drop `multi_label` for single-label classes."
)


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")


def _check_columns(targets: Tensor, num_classes: int) -> None:
    if targets.shape[1] != num_classes:
        raise ValueError(
            f"Expected probability targets with num_classes={num_classes} columns, but got shape "
            f"{tuple(targets.shape)}. Pass the matching `num_classes`."
        )


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

    Equal to mixing the rows of :func:`one_hot`, without materializing two ``(N, K)`` tensors: what the
    mixing callbacks use for index targets (large ``K`` makes the difference).

    Args:
        targets: class indices ``(N,)``, or probability (or, with ``multi_label``, multi-hot) rows ``(N, K)``.
        num_classes: ``K``.
        lam: the weight of each sample's own class: a float or ``(N,)``.
        index: the partner of each sample ``(N,)``.
        smoothing: label smoothing in ``[0, 1)``.
        out: optional tensor ``(N, K)`` of the result's dtype that receives the result for index targets (so that
            repeated calls allocate nothing); probability targets ignore it.
        shift: ``k`` when ``index`` is the cyclic shift ``index[i] == (i + k) % N``: the partners' labels are then
            a roll of the labels, and ``index`` is not read.
        multi_label: the rows are multi-hot (see :func:`one_hot`).
        validate: check the label range on accelerators too (a host sync; see the module notes).
        dtype: the dtype of rows built from indices; torch's default float dtype when ``None``.

    Example:
        >>> mixed_one_hot(torch.tensor([0, 1]), 3, 0.75, torch.tensor([1, 0]))
        tensor([[0.7500, 0.2500, 0.0000],
                [0.2500, 0.7500, 0.0000]])
    """
    _check_num_classes(num_classes)
    _check_smoothing(smoothing)
    targets = check_targets(targets)
    if targets.ndim == 2:  # probabilities or multi-hot rows: mix the rows
        probs = one_hot(targets, num_classes, smoothing, multi_label=multi_label)
        weight = lam.to(probs)[:, None] if isinstance(lam, Tensor) else float(lam)
        partners = probs.roll(-shift, 0) if shift is not None else probs[index.to(probs.device)]
        return partners.lerp_(probs, weight)
    if multi_label:
        raise ValueError(_MULTI_LABEL_INDICES.format(shape=tuple(targets.shape)))
    n = targets.shape[0]
    device = targets.device
    out_dtype = _target_dtype(dtype) if out is None else out.dtype
    if validate and device.type != "cpu":  # on CPU the scatter below checks the range itself
        check_range(targets, num_classes)
    # Weights of the own class and of the partner's class, (N, 2), in the arithmetic of mixing the smoothed
    # one-hot rows: (1 - s) * lam and (1 - s) * (1 - lam). A float lam is filled in (a kernel argument, no copy).
    weights = torch.empty((n, 2), dtype=out_dtype, device=device)
    if isinstance(lam, Tensor):
        own = lam.to(device, out_dtype)
        torch.stack([own, 1.0 - own], dim=1, out=weights).mul_(1.0 - smoothing)
    elif out_dtype == torch.float32:
        keep, lam32 = _f32(1.0 - smoothing), _f32(float(lam))  # float32 rounding, as torch would do it
        weights[:, 0].fill_(_f32(keep * lam32))
        weights[:, 1].fill_(_f32(keep * _f32(1.0 - lam32)))
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
    return _scatter(out, classes, weights, num_classes, targets, add=True)
