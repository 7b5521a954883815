"""Per-rank, reproducible random streams for callbacks.

``lightning.seed_everything`` seeds every DDP rank with the same number, so a callback drawing from
the global RNG would draw the same permutation and lambda on every rank. Callbacks own a
``torch.Generator`` seeded from (Lightning's seed, global rank) instead; its state goes into the
callback's ``state_dict`` so that a resumed run draws what an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["accelerator_index", "base_seed", "global_rng_forked", "rank_generator"]

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


def accelerator_index(device: torch.device) -> tuple[Any, int]:
    """``(torch.<type> module, index)`` of an indexed accelerator (``cuda``, ``xpu``); no index: the current one."""
    module: Any = torch.get_device_module(device.type)
    return module, device.index if device.index is not None else module.current_device()


@contextlib.contextmanager
def global_rng_forked(device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU and of ``device`` saved before the block and restored after it, whatever it draws.

    ``cpu`` and ``meta`` need the CPU RNG only; ``mps`` has one device and a module-level RNG
    (``torch.mps.get_rng_state``/``set_rng_state``, no ``torch.mps.device`` or ``current_device``); indexed
    accelerators fork the RNG of ``device``'s index.

    Example:
        >>> state = torch.get_rng_state()
        >>> with global_rng_forked(torch.device("cpu")):
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """
    with torch.random.fork_rng(devices=[]):  # the CPU RNG
        if device.type in ("cpu", "meta"):
            yield
        elif device.type == "mps":
            state = torch.mps.get_rng_state()
            try:
                yield
            finally:
                torch.mps.set_rng_state(state)
        else:
            _, index = accelerator_index(device)
            with torch.random.fork_rng(devices=[index], device_type=device.type):
                yield
