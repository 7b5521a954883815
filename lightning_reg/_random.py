"""Per-rank, reproducible random streams for callbacks.

``lightning.seed_everything`` seeds every DDP rank with the same number, so a callback drawing from
the global RNG would draw the same permutation and lambda on every rank. Callbacks own a
``torch.Generator`` seeded from (Lightning's seed, global rank) instead; its state goes into the
callback's ``state_dict`` so that a resumed run draws what an uninterrupted run would.
"""

from __future__ import annotations

import os

import torch

__all__ = ["base_seed", "rank_generator"]

_MASK_63 = (1 << 63) - 1


def base_seed() -> int:
    """Lightning's global seed (``PL_GLOBAL_SEED``, set by ``seed_everything``), else torch's initial seed."""
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is not None:
        try:
            return int(env)
        except ValueError:
            pass
    return int(torch.initial_seed()) & _MASK_63


def rank_generator(seed: int, rank: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream is a fixed function of ``(seed, rank, stream)``.

    Args:
        seed: the run's seed.
        rank: the global rank; different ranks get independent streams.
        stream: a per-callback salt so that two callbacks on one rank do not draw the same numbers.
        device: where the generator lives.

    Example:
        >>> a = rank_generator(0, 0)
        >>> b = rank_generator(0, 1)
        >>> bool(torch.rand(1, generator=a) != torch.rand(1, generator=b))
        True
    """
    # SplitMix64-style mixing so that nearby (seed, rank, stream) triples give unrelated seeds.
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    generator = torch.Generator(device=device)
    generator.manual_seed(x & _MASK_63)
    return generator
