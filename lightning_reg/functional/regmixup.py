"""RegMixup (Pinto et al., NeurIPS 2022, https://arxiv.org/abs/2206.14502): the clean batch and its mixed copy.

MixUp alone trains only on mixed samples, which leaves the model under-confident on clean ones (Wang et al.,
CVPR 2023); RegMixup keeps the clean cross-entropy and adds MixUp's as a regularizer. Here that is one batch
of ``2N`` rows, clean first: ``F.cross_entropy`` on it is ``(CE(clean) + CE(mixed)) / 2``, the RegMixup
objective with ``eta = 1`` up to the constant factor 1/2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg.functional.mixup import mixup

__all__ = ["regmixup"]


def regmixup(inputs: Tensor, targets: Tensor, lam: float | Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The RegMixup batch: ``cat([x, mixup(x)])`` and ``cat([y, mixup(y)])``, ``2N`` rows, clean first.

    Args:
        inputs: the batch ``(N, ...)``.
        targets: probabilities ``(N, K)`` (see :func:`~lightning_reg.functional.one_hot`).
        lam: the weight of the original sample, a float or ``(N,)``; RegMixup draws it from ``Beta(20, 20)``.
        index: the partner of each sample ``(N,)``.

    Returns:
        ``(inputs, targets)`` of ``2N`` rows: the first ``N`` are the clean batch itself.

    Example:
        >>> x, y = torch.tensor([[0.0], [10.0]]), torch.eye(2)
        >>> inputs, targets = regmixup(x, y, 0.75, torch.tensor([1, 0]))
        >>> inputs.squeeze(1), targets[2]
        (tensor([ 0.0000, 10.0000,  2.5000,  7.5000]), tensor([0.7500, 0.2500]))
    """
    mixed_inputs, mixed_targets = mixup(inputs, targets, lam, index)
    return torch.cat([inputs, mixed_inputs]), torch.cat([targets.to(mixed_targets.dtype), mixed_targets])
