"""DropConnect on weights: drop individual weights rather than activations."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg.functional._bernoulli import keep_mask

__all__ = ["weight_drop"]


def weight_drop(weight: Tensor, p: float, *, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """DropConnect of `Wan et al. (2013) <https://proceedings.mlr.press/v28/wan13.html>`_ on a weight tensor.

    Each weight is zeroed with probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``. Applied to the
    hidden-to-hidden matrices of an LSTM once per forward pass, this is the weight-dropped LSTM of
    `AWD-LSTM <https://arxiv.org/abs/1708.02182>`_: the same dropped matrix serves every time step, so the
    recurrence is regularized while the fused (cuDNN) kernel still runs.

    Args:
        weight: any weight tensor; gradients flow to it through the mask.
        p: probability of dropping a weight, in ``[0, 1)``.
        training: apply DropConnect; when False ``weight`` is returned unchanged.
        generator: the random stream of the mask; the global one when None. It may live on another device than
            ``weight`` (a CPU generator with CUDA weights): the mask is then drawn on the generator's device and copied.

    Example:
        >>> w = torch.ones(3, 4)
        >>> dropped = weight_drop(w, 0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(dropped.unique().tolist())), weight_drop(w, 0.5, training=False) is w
        ([0.0, 2.0], True)
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `p` in [0, 1), but got {p!r}.")
    if not training or p == 0.0:
        return weight
    keep = keep_mask(weight.shape, 1.0 - p, dtype=weight.dtype, device=weight.device, generator=generator)
    return weight * keep / (1.0 - p)
