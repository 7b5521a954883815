"""Argument checks shared by the functional core and the callbacks: one place for each, raising with the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

#: How a batch is paired for mixing: a random cyclic shift (default) or a random derangement.
Pairing = Literal["shift", "permutation"]
#: Named input layouts for CutMix's ``dims=``: the batch dim ``N`` first; the box covers the spatial or time axes.
Layout = Literal["NT", "NTD", "NCHW", "NCDHW", "NTCHW"]
_LAYOUT_DIMS: dict[str, tuple[int, ...]] = {
    "NT": (1,),  # a sequence of tokens or values: a span of time steps
    "NTD": (1,),  # a sequence of feature vectors: a span of time steps, all features
    "NCHW": (2, 3),  # images
    "NCDHW": (2, 3, 4),  # volumes: a box in depth, height and width
    "NTCHW": (3, 4),  # videos: the same box in every frame, all channels (torchvision's CutMix on videos)
}


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` as a float if it is positive and finite (a Beta concentration), else raise."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
        raise ValueError(f"Expected `{name}` to be a positive finite float, but got {alpha!r}.")
    return float(alpha)


def check_probability(p: float, name: str) -> float:
    """``p`` as a float if it lies in ``[0, 1]``, else raise."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected `{name}` to be a float in [0, 1], but got {p!r}.")
    return float(p)


def check_pairing(pairing: object) -> Pairing:
    """Return ``pairing`` if it is one of :data:`Pairing`, else raise listing the valid ones."""
    if pairing not in get_args(Pairing):
        raise ValueError(f"Expected `pairing` to be one of {list(get_args(Pairing))}, but got {pairing!r}.")
    return pairing  # type: ignore[return-value]


def check_inputs(inputs: Tensor) -> None:
    """Raise ``TypeError`` unless ``inputs`` is a real-valued tensor ``(N, ...)``."""
    if not isinstance(inputs, Tensor) or inputs.ndim < 1:
        raise TypeError(f"Expected `inputs` to be a tensor of shape (N, ...), but got {inputs!r:.80}.")
    if inputs.dtype == torch.bool or torch.is_complex(inputs):
        raise TypeError(f"Expected real-valued `inputs` (float or integer), but got dtype {inputs.dtype}.")


def check_index(inputs: Tensor, index: Tensor) -> None:
    """Raise unless ``index`` is an int tensor ``(N,)`` of positions in the batch of ``inputs``."""
    check_inputs(inputs)
    n = inputs.shape[0]
    if not isinstance(index, Tensor) or index.shape != (n,) or index.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(index.shape)} dtype {index.dtype}" if isinstance(index, Tensor) else repr(index)
        raise ValueError(f"Expected `index` as an int64 tensor of shape ({n},), a pairing of the batch, but got {got}.")
    if n > 0 and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"Expected `index` values in [0, {n}), but got [{int(index.min())}, {int(index.max())}].")


def check_lam(lam: float | Tensor, n: int) -> None:
    """Raise unless ``lam`` is a float in ``[0, 1]`` or a float tensor ``(n,)`` of such values."""
    if isinstance(lam, Tensor):
        if lam.shape != (n,) or not torch.is_floating_point(lam):
            raise ValueError(
                f"Expected a tensor `lam` as floats of shape ({n},), one per sample, but got shape "
                f"{tuple(lam.shape)} dtype {lam.dtype}. Pass a float for one lambda per batch."
            )
        if n > 0 and bool(((lam < 0) | (lam > 1)).any()):
            raise ValueError(
                f"Expected every `lam` in [0, 1], but got values in [{float(lam.min())}, {float(lam.max())}]."
            )
    elif isinstance(lam, bool) or not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"Expected `lam` to be a float in [0, 1] or a (N,) tensor, but got {lam!r}.")


def check_mix_targets(inputs: Tensor, targets: Tensor) -> None:
    """Raise unless ``targets`` are float probabilities ``(N, K)`` with the batch size of ``inputs``."""
    n = inputs.shape[0]
    if not isinstance(targets, Tensor) or targets.ndim != 2 or not torch.is_floating_point(targets):
        got = f"shape {tuple(targets.shape)} dtype {targets.dtype}" if isinstance(targets, Tensor) else repr(targets)
        raise ValueError(
            f"Expected `targets` as float probabilities of shape (N, K), but got {got}. "
            "Convert class indices with `one_hot(targets, num_classes)` first."
        )
    if targets.shape[0] != n:
        raise ValueError(
            f"Expected `inputs` and `targets` with the same batch size, but got {n} inputs and "
            f"{targets.shape[0]} targets. Check that the batch keys point at the right entries."
        )


def tracks_grad(t: Tensor) -> bool:
    """Whether an op on ``t`` now records autograd history (then ``out=`` kernels cannot be used)."""
    return t.requires_grad and torch.is_grad_enabled()


def check_out(out: Tensor, inputs: Tensor) -> None:
    """Raise unless ``out`` is ``inputs`` itself (in place) or a tensor like it that does not share its memory."""
    if (
        not isinstance(out, Tensor)
        or out.shape != inputs.shape
        or out.dtype != inputs.dtype
        or out.device != inputs.device
    ):
        got = f"({tuple(out.shape)}, {out.dtype}, {out.device})" if isinstance(out, Tensor) else repr(out)
        raise ValueError(
            f"Expected `out` like `inputs` ({tuple(inputs.shape)}, {inputs.dtype}, {inputs.device}), but got "
            f"{got}. Pass `out=torch.empty_like(inputs)`, or `out=inputs` to overwrite the inputs."
        )
    if tracks_grad(inputs):
        raise ValueError("`out=` cannot record autograd history, and `inputs` require grad: leave `out` unset.")
    ptr = out.untyped_storage().data_ptr()
    if out is not inputs and ptr != 0 and ptr == inputs.untyped_storage().data_ptr():  # ("meta" tensors have 0)
        raise ValueError("`out` shares memory with `inputs`; pass `out=inputs` itself to overwrite the inputs.")


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


def check_dims(dims: object) -> tuple[int, ...] | str | None:
    """Return ``dims`` if it is ``None``, a :data:`Layout` or axes (an int becomes a 1-tuple); else raise."""
    if dims is None or isinstance(dims, str):
        if isinstance(dims, str):
            layout_dims(dims)
        return dims
    if isinstance(dims, int) and not isinstance(dims, bool):
        return (dims,)
    if isinstance(dims, Sequence) and len(dims) > 0 and all(type(d) is int for d in dims):
        return tuple(dims)
    raise ValueError(f"Expected `dims` as axes (ints) or a layout in {list(get_args(Layout))}, but got {dims!r}.")


def resolve_dims(inputs: Tensor, dims: Sequence[int] | int | str | None) -> tuple[int, ...]:
    """The sorted non-batch axes of ``inputs`` that CutMix cuts along, from ``dims`` (see :func:`default_dims`)."""
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


def check_box(lo: Tensor, hi: Tensor, n: int, d: int) -> None:
    """Raise unless the box corners ``lo``/``hi`` are ``(1, d)`` (one box) or ``(n, d)`` (a box per sample)."""
    if lo.ndim != 2 or lo.shape != hi.shape or lo.shape[1] != d or lo.shape[0] not in (1, n):
        raise ValueError(
            f"Expected a box with `lo`/`hi` of shape (1, {d}) or ({n}, {d}), but got {tuple(lo.shape)} and "
            f"{tuple(hi.shape)}. Draw it with `sample_box(lam, sizes)`."
        )


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


def check_num_classes(num_classes: int) -> None:
    """Raise unless ``num_classes`` is a positive int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")


def check_smoothing(smoothing: float, name: str = "smoothing") -> float:
    """``smoothing`` as a float if it lies in ``[0, 1)``, else raise."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"Expected `{name}` to be a float in [0, 1), but got {smoothing!r}.")
    return float(smoothing)


def check_targets(targets: object, name: str = "targets") -> Tensor:
    """Return ``targets`` if they are class indices ``(N,)`` (integer) or probabilities ``(N, K)`` (float).

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


def check_columns(targets: Tensor, num_classes: int) -> None:
    """Raise unless probability targets ``(N, K)`` have ``num_classes`` columns."""
    if targets.shape[1] != num_classes:
        raise ValueError(
            f"Expected probability targets with num_classes={num_classes} columns, but got shape "
            f"{tuple(targets.shape)}. Pass the matching `num_classes`."
        )


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


MULTI_LABEL_INDICES = (
    "`multi_label=True` expects multi-hot float rows (N, K), but got class indices of shape {shape}. Build the "
    "multi-hot rows in the dataset, or drop `multi_label` for single-label classes."
)
