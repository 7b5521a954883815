"""The two private torch functions lightning-reg relies on, each behind one function.

torch has no public equivalent of either (checked for torch 2.14): ``torch.distributions.Gamma`` and ``Beta`` take no
``generator``, and no public call counts the references to a tensor's storage. A private function can change or
vanish in any torch release; ``tests/test_torch_private.py`` checks both against public torch, so an upgrade that
breaks them fails there, loudly, instead of changing draws or memory reuse silently.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["standard_gamma", "storage_use_count"]

# Looked up once; `None` if a torch release drops it (then buffers are never reused, which is safe).
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def standard_gamma(concentration: Tensor, generator: torch.Generator | None) -> Tensor:
    """``Gamma(concentration, 1)`` draws from ``generator``: the primitive ``torch.distributions.Gamma`` samples with.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bool((standard_gamma(torch.full((3,), 2.0), g) > 0).all())
        True
    """
    return torch._standard_gamma(concentration, generator=generator)


def storage_use_count(t: Tensor) -> int | None:
    """How many references torch holds to ``t``'s storage, besides the one this call makes; ``None`` if unknown.

    Example:
        >>> t = torch.zeros(3)
        >>> view = t[1:]
        >>> storage_use_count(t)  # `t` and `view`
        2
    """
    if _USE_COUNT is None:
        return None
    storage = t.untyped_storage()  # holds one reference while we count
    return int(_USE_COUNT(storage._cdata)) - 1
