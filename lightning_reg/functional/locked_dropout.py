"""Locked (variational) dropout: one dropout mask per sequence, shared by all its time steps."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg.functional._bernoulli import keep_mask

__all__ = ["locked_dropout"]


def locked_dropout(
    x: Tensor,
    p: float,
    *,
    training: bool = True,
    batch_first: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Variational dropout of `Gal & Ghahramani (2016) <https://arxiv.org/abs/1512.05287>`_ for sequences.

    Standard dropout draws a new mask at every time step; locked dropout (the name of
    `AWD-LSTM <https://arxiv.org/abs/1708.02182>`_) draws one mask per sequence and feature and applies it
    at every step, so a dropped unit stays dropped for the whole sequence. Kept units are scaled by
    ``1 / (1 - p)`` so the expectation is unchanged.

    Args:
        x: a sequence batch ``(N, T, C)`` (``batch_first``) or ``(T, N, C)``; any trailing feature shape works.
        p: probability of dropping a unit, in ``[0, 1)``.
        training: apply dropout; when False ``x`` is returned unchanged.
        batch_first: whether the batch dimension comes first (else time comes first).
        generator: the random stream of the mask; the global one when None. It may live on another device than
            ``x`` (a CPU generator with CUDA inputs): the mask is then drawn on the generator's device and copied.

    Returns:
        ``x`` times a mask that is constant along the time dimension.

    Example:
        >>> x = torch.ones(2, 5, 3)
        >>> y = locked_dropout(x, 0.5, generator=torch.Generator().manual_seed(0))
        >>> bool((y == y[:, :1]).all())  # the same mask at every time step
        True
        >>> sorted(set(y.unique().tolist()))
        [0.0, 2.0]
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `p` in [0, 1), but got {p!r}.")
    if x.ndim < 3:
        raise ValueError(
            f"Expected a sequence batch with at least 3 dimensions ((N, T, C) or (T, N, C)), but got shape "
            f"{tuple(x.shape)}; use plain dropout for (N, C) inputs."
        )
    if not training or p == 0.0:
        return x
    time_dim = 1 if batch_first else 0
    mask_shape = list(x.shape)
    mask_shape[time_dim] = 1  # (N, 1, C): broadcast over time
    keep = keep_mask(mask_shape, 1.0 - p, dtype=x.dtype, device=x.device, generator=generator)
    return x * keep / (1.0 - p)
