"""Output tensors the mixing callbacks own and reuse when nothing else holds them (see docs/mixing.md, "Speed")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_reg._torch_private import storage_use_count


class ReusableOutput:
    """A private output tensor, handed out again only when nothing else refers to its memory.

    :meth:`take` returns an alias (a view) of a tensor this object owns. Whatever keeps the alias, a view of it, or
    anything built on its memory (an autograd graph that saved it, ``.numpy()``, ``.detach()``) holds a reference to
    the storage, which torch counts; the next :meth:`take` reuses the memory only when this object is the last
    holder, else it allocates and leaves the old tensor to its holders. So reuse never changes a tensor someone can
    still read.

    Example:
        >>> out = ReusableOutput()
        >>> a = out.take(torch.zeros(2, 3))
        >>> b = out.take(torch.zeros(2, 3))  # `a` is alive: new memory
        >>> a.data_ptr() != b.data_ptr()
        True
    """

    def __init__(self) -> None:
        self._tensor: Tensor | None = None

    def take(self, like: Tensor) -> Tensor | None:
        """A tensor like ``like`` (its memory layout too) that nobody else holds; ``None`` if ``like`` requires grad.

        (``out=`` kernels record no autograd history, so inputs that require grad are mixed into new tensors.)
        """
        if like.requires_grad:
            return None
        if not self._reusable(like.shape, like.dtype, like.device):
            self._tensor = torch.empty_like(like)
        assert self._tensor is not None
        return self._tensor.view(self._tensor.shape)

    def take_empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``, ``dtype`` and ``device`` that nobody else holds."""
        if not self._reusable(shape, dtype, device):
            self._tensor = torch.empty(shape, dtype=dtype, device=device)
        assert self._tensor is not None
        return self._tensor.view(self._tensor.shape)

    def _reusable(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the owned tensor has this shape, dtype and device, and nothing but this object holds it."""
        t = self._tensor
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            return False
        return storage_use_count(t) == 1  # `t` itself only; unknown (None) never reuses

    def release(self) -> None:
        """Drop the owned tensor (its memory goes back once its other holders let go)."""
        self._tensor = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_tensor": None}  # a scratch tensor is not state: never pickled or deep-copied
