"""MixUp (Zhang et al., 2018, https://arxiv.org/abs/1710.09412): convex combinations of sample pairs.

Sampling is separate from applying: :func:`sample_mixup` draws lambda from ``Beta(alpha, alpha)`` and the
pairing from a ``torch.Generator``; :func:`mixup` is deterministic given them. ``lam`` weights the original
sample: ``out = lam * x + (1 - lam) * x[index]``, and the same for the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MixingParams", "mixup", "mixup_inputs", "sample_beta", "sample_mixup"]


@dataclass(frozen=True)
class MixingParams:
    """What one MixUp or CutMix draw decided for a batch.

    Attributes:
        lam: weight of the original sample: a float (one for the batch) or a ``(N,)`` tensor (per sample).
        index: the partner of every sample, a permutation ``(N,)`` of the batch.
    """

    lam: float | Tensor
    index: Tensor


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


def sample_mixup(
    batch_size: int, alpha: float, *, per_sample: bool = False, generator: torch.Generator | None = None
) -> MixingParams:
    """Draw lambda from ``Beta(alpha, alpha)`` and a random pairing (a permutation) for a batch.

    Args:
        batch_size: ``N``.
        alpha: concentration of the Beta distribution; small values keep most samples nearly unmixed.
        per_sample: one lambda per sample (a ``(N,)`` float32 tensor) instead of one float for the batch.
        generator: the source of randomness (CPU); the global RNG when ``None``.

    Returns:
        :class:`MixingParams` ``(lam, index)``; ``index`` is int64 on the generator's device.

    Example:
        >>> params = sample_mixup(4, 0.2, generator=torch.Generator().manual_seed(0))
        >>> isinstance(params.lam, float), sorted(params.index.tolist())
        (True, [0, 1, 2, 3])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    device = generator.device if generator is not None else torch.device("cpu")
    lam: float | Tensor
    if per_sample:
        lam = sample_beta(alpha, (batch_size,), generator=generator).to(torch.float32)
    else:
        lam = float(sample_beta(alpha, generator=generator))
    index = torch.randperm(batch_size, generator=generator, device=device)
    return MixingParams(lam=lam, index=index)


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


def check_inputs_args(inputs: Tensor, lam: float | Tensor, index: Tensor) -> None:
    """Validate ``inputs``, ``lam`` and ``index``; raise with a fix in the message."""
    if not isinstance(inputs, Tensor) or inputs.ndim < 1:
        raise TypeError(f"Expected `inputs` to be a tensor of shape (N, ...), but got {inputs!r:.80}.")
    if inputs.dtype == torch.bool or torch.is_complex(inputs):
        raise TypeError(f"Expected real-valued `inputs` (float or integer), but got dtype {inputs.dtype}.")
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
    return mixup_inputs(inputs, lam, index, inplace=inplace, buffer=buffer), mix_targets(targets, lam, index)


def mixup_inputs(
    inputs: Tensor, lam: float | Tensor, index: Tensor, *, inplace: bool = False, buffer: Tensor | None = None
) -> Tensor:
    """The input half of :func:`mixup` (targets are mixed elsewhere, e.g. by ``mixed_one_hot``).

    Example:
        >>> mixup_inputs(torch.tensor([[0.0], [10.0]]), 0.75, torch.tensor([1, 0]))
        tensor([[2.5000],
                [7.5000]])
    """
    check_inputs_args(inputs, lam, index)
    index = index.to(inputs.device)
    if not torch.is_floating_point(inputs):
        blended = torch.lerp(inputs.float(), inputs[index].float(), 1.0 - broadcast_lam(lam, inputs.float()))
        blended = blended.round_().to(inputs.dtype)
        return inputs.copy_(blended) if inplace else blended
    if buffer is not None:
        if buffer.shape != inputs.shape or buffer.dtype != inputs.dtype or buffer.device != inputs.device:
            raise ValueError(
                f"Expected `buffer` like `inputs` ({tuple(inputs.shape)}, {inputs.dtype}), but got "
                f"({tuple(buffer.shape)}, {buffer.dtype}). Pass `buffer=torch.empty_like(inputs)`."
            )
        partner = torch.index_select(inputs, 0, index, out=buffer)
    else:
        partner = inputs[index]  # (N, ...) a fresh tensor
    if inplace:
        # x + (1 - lam) * (partner - x)
        weight = 1.0 - broadcast_lam(lam, inputs) if isinstance(lam, Tensor) else 1.0 - float(lam)
        return inputs.lerp_(partner, weight)
    if buffer is not None:
        return torch.lerp(partner, inputs, broadcast_lam(lam, inputs))
    # Reuse the gathered tensor as the output: partner + lam * (x - partner). One allocation in all.
    return partner.lerp_(inputs, broadcast_lam(lam, inputs))
