"""MixUp (Zhang et al., 2018, https://arxiv.org/abs/1710.09412): convex combinations of sample pairs.

Draw, then apply (torchvision v2's split): :func:`sample_mixup` draws lambda from ``Beta(alpha, alpha)`` and the
pairing from a ``torch.Generator``; :func:`mixup` is deterministic given them. ``lam`` weights the original
sample: ``out = lam * x + (1 - lam) * x[index]``, and the same for the targets. A pairing that is a cyclic shift
of the batch (what :func:`sample_mixup` draws by default) is blended without gathering the partners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_reg.functional._apply import blend, mix_targets, to_device
from lightning_reg.functional._checks import (
    Pairing,
    check_alpha,
    check_index,
    check_lam,
    check_mix_targets,
    check_out,
    check_pairing,
)
from lightning_reg.functional._draws import beta, beta_float, cyclic_shift, derangement, random_shift

__all__ = ["MixingParams", "Pairing", "mixup", "sample_mixup"]


@dataclass(frozen=True)
class MixingParams:
    """What one MixUp or CutMix draw decided for a batch.

    Attributes:
        lam: weight of the original sample: a float (one for the batch) or a ``(N,)`` tensor (per sample).
        index: the partner of every sample, a permutation ``(N,)`` of the batch.
        shift: ``k`` when the pairing is the cyclic shift ``index[i] == (i + k) % N``, else ``None``.

    Example:
        >>> params = MixingParams(lam=0.7, index=torch.tensor([1, 2, 0]), shift=1)
        >>> x, y = mixup(torch.eye(3), torch.eye(3), params.lam, params.index)
        >>> y[0]
        tensor([0.7000, 0.3000, 0.0000])
    """

    lam: float | Tensor
    index: Tensor
    shift: int | None = None

    def to(self, device: torch.device) -> MixingParams:
        """These draws on ``device``; a CUDA device gets them through pinned memory, without blocking the host."""
        lam = to_device(self.lam, device) if isinstance(self.lam, Tensor) else self.lam
        return MixingParams(lam=lam, index=to_device(self.index, device), shift=self.shift)


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
        pairing: ``"shift"``: sample ``i`` with ``(i + k) % N`` for ``k`` uniform in ``1..N-1`` (needs batches in
            random order, as timm's and torchvision's pairings do); ``"permutation"``: a uniformly random
            derangement, robust to any batch order (see docs/mixing.md).
        generator: the source of randomness (CPU); the global RNG when ``None``.

    Returns:
        :class:`MixingParams`; ``index`` is int64 on the generator's device.

    Example:
        >>> params = sample_mixup(4, 0.2, generator=torch.Generator().manual_seed(0))
        >>> isinstance(params.lam, float), sorted(params.index.tolist()), params.shift in (1, 2, 3)
        (True, [0, 1, 2, 3], True)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    check_pairing(pairing)
    alpha = check_alpha(alpha)
    lam: float | Tensor
    if per_sample:
        lam = beta(alpha, (batch_size,), generator=generator).to(torch.float32)
    else:
        lam = beta_float(alpha, generator)
    if batch_size == 1:  # nothing to mix with: the sample is its own partner, and lam is irrelevant
        device = generator.device if generator is not None else torch.device("cpu")
        return MixingParams(lam=lam, index=torch.zeros(1, dtype=torch.long, device=device), shift=0)
    if pairing == "permutation":
        return MixingParams(lam=lam, index=derangement(batch_size, generator=generator))
    index, shift = random_shift(batch_size, generator)
    return MixingParams(lam=lam, index=index, shift=shift)


def mixup(
    inputs: Tensor, targets: Tensor, lam: float | Tensor, index: Tensor, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """MixUp of a batch: ``lam * x + (1 - lam) * x[index]`` for inputs and targets.

    Integer inputs (``uint8`` images) are blended in float32 and rounded back to their dtype (half to even),
    as timm's ``FastCollateMixup`` does.

    Args:
        inputs: any batch ``(N, ...)``, floating or integer.
        targets: probabilities ``(N, K)`` (see :func:`one_hot`).
        lam: weight of the original sample: a float in ``[0, 1]`` or a ``(N,)`` tensor.
        index: the partner of each sample ``(N,)``, e.g. from :func:`sample_mixup`.
        out: a tensor like ``inputs`` that receives the mixed inputs (so repeated calls allocate nothing), or
            ``inputs`` itself to mix in place.

    Returns:
        ``(mixed_inputs, mixed_targets)``.

    Example:
        >>> mixup(torch.tensor([[0.0], [10.0]]), torch.eye(2), 0.75, torch.tensor([1, 0]))
        (tensor([[2.5000],
                [7.5000]]), tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]]))
    """
    check_index(inputs, index)
    check_lam(lam, inputs.shape[0])
    check_mix_targets(inputs, targets)
    if out is not None:
        check_out(out, inputs)
    return blend(inputs, lam, index, cyclic_shift(index), out=out), mix_targets(targets, lam, index)
