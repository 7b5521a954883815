"""MixUp (Zhang et al., 2018, https://arxiv.org/abs/1710.09412): convex combinations of sample pairs.

Sampling is separate from applying: :func:`sample_mixup` draws lambda from ``Beta(alpha, alpha)`` and the
pairing from a ``torch.Generator``; :func:`mixup` is deterministic given them. ``lam`` weights the original
sample: ``out = lam * x + (1 - lam) * x[index]``, and the same for the targets.

Speed: a pairing that is a cyclic shift of the batch (``index[i] == (i + k) % N``, what ``sample_mixup`` draws
by default, and torchvision's ``roll(1)``) is applied without gathering the partners: they are two contiguous
runs of the batch, so the blend is one ``torch.lerp`` pass, the cost of blending two tensors. Any other
permutation is gathered first (one extra copy of the batch). Both give bit-identical results. The callbacks
call :func:`apply_mixup` with the draw itself, which knows its shift and is not validated a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "MixingParams",
    "Pairing",
    "apply_mixup",
    "cyclic_shift",
    "derangement",
    "mixup",
    "mixup_inputs",
    "sample_beta",
    "sample_mixup",
]

Pairing = Literal["shift", "permutation"]


@dataclass(frozen=True)
class MixingParams:
    """What one MixUp or CutMix draw decided for a batch.

    Attributes:
        lam: weight of the original sample: a float (one for the batch) or a ``(N,)`` tensor (per sample).
        index: the partner of every sample, a permutation ``(N,)`` of the batch.
        shift: ``k`` when the pairing is the cyclic shift ``index[i] == (i + k) % N``, else ``None``.

    Example:
        >>> import torch
        >>> params = MixingParams(lam=0.7, index=torch.tensor([1, 2, 0]), shift=1)
        >>> x, y = mixup(torch.eye(3), torch.eye(3), params.lam, params.index)
        >>> y[0]
        tensor([0.7000, 0.3000, 0.0000])
    """

    lam: float | Tensor
    index: Tensor
    shift: int | None = None

    def to(self, device: torch.device) -> MixingParams:
        """These draws on ``device``, copied without blocking the host (see :func:`to_device`)."""
        lam = to_device(self.lam, device) if isinstance(self.lam, Tensor) else self.lam
        return MixingParams(lam=lam, index=to_device(self.index, device), shift=self.shift)


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


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
        raise ValueError(f"Expected `{name}` to be a positive finite float, but got {alpha!r}.")
    return float(alpha)


def sample_beta(alpha: float, size: tuple[int, ...] = (), *, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``Beta(alpha, alpha)`` samples (float64, on the generator's device) from ``generator``.

    ``torch.distributions.Beta`` takes no generator; this draws the two Gamma variates through the same
    primitive it uses (``torch._standard_gamma``), with the generator, so draws are reproducible and
    per-rank.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> lam = sample_beta(0.4, (3,), generator=g)
        >>> lam.shape, bool(((lam >= 0) & (lam <= 1)).all())
        (torch.Size([3]), True)
    """
    alpha = _check_alpha(alpha)
    device = generator.device if generator is not None else torch.device("cpu")
    concentration = torch.full((2, *size), alpha, dtype=torch.float64, device=device)
    gammas = torch._standard_gamma(concentration, generator=generator)
    total = gammas[0] + gammas[1]
    # Both Gamma draws can underflow to 0 for tiny alpha; Beta then sits at 0 or 1: pick by the larger one.
    return torch.where(total > 0, gammas[0] / total.clamp_min(torch.finfo(torch.float64).tiny), gammas[0] >= gammas[1])


def check_pairing(pairing: object) -> Pairing:
    """Return ``pairing`` if it is one of :data:`Pairing`, else raise listing the valid ones."""
    if pairing not in get_args(Pairing):
        raise ValueError(f"Expected `pairing` to be one of {list(get_args(Pairing))}, but got {pairing!r}.")
    return pairing  # type: ignore[return-value]


def _sample_beta_float(alpha: float, generator: torch.Generator | None) -> float:
    """One ``Beta(alpha, alpha)`` draw as a float: :func:`sample_beta` with the arithmetic in Python floats.

    Same draws and the same float64 arithmetic as ``float(sample_beta(alpha))``, without six small tensor ops.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    concentration = torch.full((2,), alpha, dtype=torch.float64, device=device)
    a, b = torch._standard_gamma(concentration, generator=generator).tolist()
    return a / (a + b) if a + b > 0 else float(a >= b)


def sample_mixup(
    batch_size: int,
    alpha: float,
    *,
    per_sample: bool = False,
    pairing: Pairing = "shift",
    generator: torch.Generator | None = None,
) -> MixingParams:
    """Draw lambda from ``Beta(alpha, alpha)`` and a random pairing for a batch.

    Args:
        batch_size: ``N``.
        alpha: concentration of the Beta distribution; small values keep most samples nearly unmixed.
        per_sample: one lambda per sample (a ``(N,)`` float32 tensor) instead of one float for the batch.
        pairing: ``"shift"`` (default): sample ``i`` is paired with sample ``(i + k) % N`` for a shift ``k``
            drawn uniformly from ``1..N-1``; every sample gets a partner other than itself, and the blend needs
            no gather (see the module notes). Like timm (``flip``) and torchvision (``roll(1)``) it relies on
            the batch being in random order (``shuffle=True``, the usual training loader); with batches in a
            fixed order (e.g. sorted by class) use ``"permutation"``: a uniformly random derangement (a
            permutation without fixed points, so no sample is paired with itself), robust to any batch order,
            about 1.3x slower to apply.
        generator: the source of randomness (CPU); the global RNG when ``None``.

    Returns:
        :class:`MixingParams` ``(lam, index, shift)``; ``index`` is int64 on the generator's device, ``shift``
        is ``k`` for the shift pairing and ``None`` for a permutation.

    Example:
        >>> params = sample_mixup(4, 0.2, generator=torch.Generator().manual_seed(0))
        >>> isinstance(params.lam, float), sorted(params.index.tolist()), cyclic_shift(params.index) in (1, 2, 3)
        (True, [0, 1, 2, 3], True)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    check_pairing(pairing)
    device = generator.device if generator is not None else torch.device("cpu")
    lam: float | Tensor
    if per_sample:
        lam = sample_beta(alpha, (batch_size,), generator=generator).to(torch.float32)
    else:
        lam = _sample_beta_float(_check_alpha(alpha), generator)
    if batch_size == 1:  # nothing to mix with: the sample is its own partner, and lam is irrelevant
        return MixingParams(lam=lam, index=torch.zeros(1, dtype=torch.long, device=device), shift=0)
    if pairing == "permutation":
        return MixingParams(lam=lam, index=derangement(batch_size, generator=generator))
    shift = int(torch.randint(1, batch_size, (), generator=generator, device=device))
    index = torch.arange(batch_size, device=device).roll(-shift)  # index[i] = (i + shift) % N
    return MixingParams(lam=lam, index=index, shift=shift)


def derangement(n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``0..n-1`` without fixed points (``index[i] != i``), ``n >= 2``.

    Rejection sampling from ``torch.randperm``: a random permutation is a derangement with probability about
    ``1/e``, so about 2.7 draws on average. The check reads the permutation, so draw on a CPU generator.

    Example:
        >>> index = derangement(5, generator=torch.Generator().manual_seed(0))
        >>> sorted(index.tolist()), bool((index != torch.arange(5)).all())
        ([0, 1, 2, 3, 4], True)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"Expected `n` to be an int >= 2 (a single sample has no other partner), but got {n!r}.")
    device = generator.device if generator is not None else torch.device("cpu")
    positions = torch.arange(n, device=device)
    while True:
        index = torch.randperm(n, generator=generator, device=device)
        if not bool((index == positions).any()):
            return index


def cyclic_shift(index: Tensor) -> int | None:
    """``k`` when ``index[i] == (i + k) % N`` for every ``i`` (a roll of the batch), else ``None``.

    Only CPU indices are inspected (reading a GPU index would synchronize); others give ``None``.

    Example:
        >>> cyclic_shift(torch.tensor([2, 3, 0, 1])), cyclic_shift(torch.tensor([1, 0, 3, 2]))
        (2, None)
    """
    n = index.shape[0] if index.ndim == 1 else 0
    if n == 0 or index.device.type != "cpu":
        return None
    shift = int(index[0])
    # A cheap necessary condition first: a random permutation fails it with probability about 1 - 1/N.
    if not 0 <= shift < n or int(index[-1]) != (shift - 1) % n:
        return None
    return shift if torch.equal(index, torch.arange(n, dtype=index.dtype).roll(-shift)) else None


def check_mix_args(inputs: Tensor, targets: Tensor, lam: float | Tensor, index: Tensor) -> None:
    """Validate the arguments shared by :func:`mixup` and ``cutmix``; raise with a fix in the message."""
    check_inputs_args(inputs, lam, index)
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


def check_inputs(inputs: Tensor) -> None:
    """Raise ``TypeError`` unless ``inputs`` is a real-valued tensor ``(N, ...)``."""
    if not isinstance(inputs, Tensor) or inputs.ndim < 1:
        raise TypeError(f"Expected `inputs` to be a tensor of shape (N, ...), but got {inputs!r:.80}.")
    if inputs.dtype == torch.bool or torch.is_complex(inputs):
        raise TypeError(f"Expected real-valued `inputs` (float or integer), but got dtype {inputs.dtype}.")


def check_inputs_args(inputs: Tensor, lam: float | Tensor, index: Tensor) -> None:
    """Validate ``inputs``, ``lam`` and ``index``; raise with a fix in the message."""
    check_inputs(inputs)
    n = inputs.shape[0]
    if not isinstance(index, Tensor) or index.shape != (n,) or index.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(index.shape)} dtype {index.dtype}" if isinstance(index, Tensor) else repr(index)
        raise ValueError(f"Expected `index` as an int64 tensor of shape ({n},), a pairing of the batch, but got {got}.")
    if n > 0 and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"Expected `index` values in [0, {n}), but got [{int(index.min())}, {int(index.max())}].")
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


def mixup(
    inputs: Tensor,
    targets: Tensor,
    lam: float | Tensor,
    index: Tensor,
    *,
    inplace: bool = False,
    buffer: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MixUp of a batch: ``lam * x + (1 - lam) * x[index]`` for inputs and targets.

    Integer inputs (``uint8`` images) are blended in float32 and rounded back to their dtype (half to even),
    as timm's ``FastCollateMixup`` does; the blend of two in-range values stays in range.

    Args:
        inputs: any batch ``(N, ...)``, floating or integer.
        targets: probabilities ``(N, K)`` (see :func:`one_hot`).
        lam: weight of the original sample: a float in ``[0, 1]`` or a ``(N,)`` tensor.
        index: the partner of each sample ``(N,)``, e.g. from :func:`sample_mixup`.
        inplace: overwrite ``inputs`` (no new batch is allocated). Only safe when nothing else holds that tensor.
        buffer: optional scratch tensor shaped like ``inputs`` that receives the gathered partners, so that
            repeated calls allocate nothing; it must not alias ``inputs``.
        out: optional tensor like ``inputs`` (not sharing its memory) that receives the mixed
            inputs, so that repeated calls allocate nothing for them.

    Returns:
        ``(mixed_inputs, mixed_targets)``.

    Example:
        >>> x = torch.tensor([[0.0], [10.0]])
        >>> y = torch.eye(2)
        >>> mixup(x, y, 0.75, torch.tensor([1, 0]))
        (tensor([[2.5000],
                [7.5000]]), tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]]))
    """
    check_mix_args(inputs, targets, lam, index)
    mixed = mixup_inputs(inputs, lam, index, inplace=inplace, buffer=buffer, out=out)
    return mixed, mix_targets(targets, lam, index)


def tracks_grad(t: Tensor) -> bool:
    """Whether an op on ``t`` now records autograd history (then ``out=`` kernels cannot be used)."""
    return t.requires_grad and torch.is_grad_enabled()


def check_out(out: Tensor, inputs: Tensor, name: str = "out") -> None:
    """Raise unless ``out`` is a tensor like ``inputs`` (any strides) that does not share its memory."""
    if (
        not isinstance(out, Tensor)
        or out.shape != inputs.shape
        or out.dtype != inputs.dtype
        or out.device != inputs.device
    ):
        got = f"({tuple(out.shape)}, {out.dtype}, {out.device})" if isinstance(out, Tensor) else repr(out)
        raise ValueError(
            f"Expected `{name}` like `inputs` ({tuple(inputs.shape)}, {inputs.dtype}, {inputs.device}), but got "
            f"{got}. Pass `{name}=torch.empty_like(inputs)`."
        )
    if tracks_grad(inputs):
        raise ValueError(f"`{name}=` cannot record autograd history, and `inputs` require grad: leave `{name}` unset.")
    ptr = out.untyped_storage().data_ptr()
    if ptr != 0 and ptr == inputs.untyped_storage().data_ptr():  # (tensors without memory, on "meta", have 0)
        raise ValueError(f"`{name}` shares memory with `inputs`; pass `inplace=True` to overwrite the inputs instead.")


def _lerp_shifted(inputs: Tensor, shift: int, weight: float | Tensor, out: Tensor) -> Tensor:
    """``out[i] = lerp(inputs[(i + shift) % N], inputs[i], weight[i])`` without gathering the partners."""
    n = inputs.shape[0]
    head, tail = (weight[: n - shift], weight[n - shift :]) if isinstance(weight, Tensor) else (weight, weight)
    # Rows 0..N-k-1 pair with rows k..N-1, rows N-k..N-1 with rows 0..k-1: two contiguous runs, no copy.
    torch.lerp(inputs[shift:], inputs[: n - shift], head, out=out[: n - shift])
    torch.lerp(inputs[:shift], inputs[n - shift :], tail, out=out[n - shift :])
    return out


def mixup_inputs(
    inputs: Tensor,
    lam: float | Tensor,
    index: Tensor,
    *,
    inplace: bool = False,
    buffer: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The input half of :func:`mixup` (targets are mixed elsewhere, e.g. by ``mixed_one_hot``).

    Args:
        inputs: any batch ``(N, ...)``, floating or integer.
        lam: weight of the original sample: a float in ``[0, 1]`` or a ``(N,)`` tensor.
        index: the partner of each sample ``(N,)``.
        inplace: overwrite ``inputs``; see :func:`mixup`.
        buffer: scratch for the gathered partners with ``inplace``; see :func:`mixup`.
        out: a tensor like ``inputs`` (not sharing its memory) that receives the result, so that
            repeated calls allocate nothing; returned.

    Example:
        >>> mixup_inputs(torch.tensor([[0.0], [10.0]]), 0.75, torch.tensor([1, 0]))
        tensor([[2.5000],
                [7.5000]])
    """
    check_inputs_args(inputs, lam, index)
    return apply_mixup(inputs, MixingParams(lam, index, cyclic_shift(index)), inplace=inplace, buffer=buffer, out=out)


def apply_mixup(
    inputs: Tensor,
    params: MixingParams,
    *,
    inplace: bool = False,
    buffer: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`mixup_inputs` for a draw of :func:`sample_mixup`, trusted as drawn (what the callbacks call).

    ``params.lam`` and ``params.index`` are not checked again, and ``params.shift`` says whether the pairing is
    a cyclic shift; only ``inputs`` and ``out`` are checked. Same results as :func:`mixup_inputs`.

    Example:
        >>> params = sample_mixup(2, 1.0, generator=torch.Generator().manual_seed(0))
        >>> x = torch.tensor([[0.0], [10.0]])
        >>> torch.equal(apply_mixup(x, params), mixup_inputs(x, params.lam, params.index))
        True
    """
    check_inputs(inputs)
    lam, index = params.lam, params.index
    if out is not None:
        if inplace:
            raise ValueError("Pass either `inplace=True` or `out=`, not both.")
        check_out(out, inputs)
    if not torch.is_floating_point(inputs):
        index = index.to(inputs.device)
        blended = torch.lerp(inputs.float(), inputs[index].float(), 1.0 - broadcast_lam(lam, inputs.float()))
        blended = blended.round_().to(inputs.dtype)
        if out is not None:
            return out.copy_(blended)
        return inputs.copy_(blended) if inplace else blended
    if buffer is not None:
        check_out(buffer, inputs, "buffer")
    weight = broadcast_lam(lam, inputs)
    # `out=` kernels do not record autograd history: inputs that need a graph take the gather path.
    shift = None if inplace or tracks_grad(inputs) else params.shift
    if shift is not None:
        return _lerp_shifted(inputs, shift, weight, out if out is not None else torch.empty_like(inputs))
    index = index.to(inputs.device)
    if inplace:
        partner = torch.index_select(inputs, 0, index, out=buffer) if buffer is not None else inputs[index]
        # x + (1 - lam) * (partner - x)
        return inputs.lerp_(partner, 1.0 - weight)
    if out is not None:
        # Gather the partners into `out`, then blend the inputs into them: partner + lam * (x - partner).
        return torch.index_select(inputs, 0, index, out=out).lerp_(inputs, weight)
    if buffer is not None:
        return torch.lerp(torch.index_select(inputs, 0, index, out=buffer), inputs, weight)
    # Reuse the gathered tensor as the output: partner + lam * (x - partner). One allocation in all.
    return inputs[index].lerp_(inputs, weight)
