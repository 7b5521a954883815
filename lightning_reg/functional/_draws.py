"""Random draws shared by the samplers and the callbacks: Beta variates, derangements, shifts; torch RNG only."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reg._torch_private import standard_gamma


def generator_device(generator: torch.Generator | None) -> torch.device:
    """The device draws from ``generator`` land on (the CPU for the global RNG)."""
    return generator.device if generator is not None else torch.device("cpu")


def beta(alpha: float, size: tuple[int, ...] = (), *, generator: torch.Generator | None = None) -> Tensor:
    """``Beta(alpha, alpha)`` samples (float64, on the generator's device) from two Gamma variates.

    ``torch.distributions.Beta`` takes no generator; this draws the two Gamma variates through the primitive it
    samples with (see :mod:`lightning_reg._torch_private`), with the generator, so draws are reproducible and
    per-rank. ``alpha`` is trusted (checked by the callers).

    Example:
        >>> lam = beta(0.4, (3,), generator=torch.Generator().manual_seed(0))
        >>> lam.shape, bool(((lam >= 0) & (lam <= 1)).all())
        (torch.Size([3]), True)
    """
    concentration = torch.full((2, *size), alpha, dtype=torch.float64, device=generator_device(generator))
    gammas = standard_gamma(concentration, generator)
    total = gammas[0] + gammas[1]
    # Both Gamma draws can underflow to 0 for tiny alpha; Beta then sits at 0 or 1: pick by the larger one.
    return torch.where(total > 0, gammas[0] / total.clamp_min(torch.finfo(torch.float64).tiny), gammas[0] >= gammas[1])


def beta_float(alpha: float, generator: torch.Generator | None) -> float:
    """One :func:`beta` draw as a Python float: the same draws and float64 arithmetic, without six tensor ops."""
    concentration = torch.full((2,), alpha, dtype=torch.float64, device=generator_device(generator))
    a, b = standard_gamma(concentration, generator).tolist()
    return a / (a + b) if a + b > 0 else float(a >= b)


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
    device = generator_device(generator)
    positions = torch.arange(n, device=device)
    while True:
        index = torch.randperm(n, generator=generator, device=device)
        if not bool((index == positions).any()):
            return index


def random_shift(n: int, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """A pairing ``index[i] == (i + k) % n`` for ``k`` uniform in ``1..n-1`` (``n >= 2``), and ``k``."""
    device = generator_device(generator)
    shift = int(torch.randint(1, n, (), generator=generator, device=device))
    return torch.arange(n, device=device).roll(-shift), shift


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
