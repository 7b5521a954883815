"""The module form of locked (variational) dropout."""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.dropout import _DropoutNd

from lightning_reg.functional.locked_dropout import locked_dropout

__all__ = ["LockedDropout"]


class LockedDropout(_DropoutNd):
    """Locked (variational) dropout: one mask per sequence, the same at every time step.

    See :func:`lightning_reg.functional.locked_dropout.locked_dropout`. It subclasses torch's dropout base class,
    so code that finds dropout layers by type (Monte-Carlo dropout, ``model.eval()``) finds it too.

    Args:
        p: probability of dropping a unit, in ``[0, 1)``.
        batch_first: inputs are ``(N, T, C)`` (else ``(T, N, C)``).

    Example:
        >>> import torch
        >>> drop = LockedDropout(0.5)
        >>> y = drop(torch.ones(2, 4, 3))
        >>> bool((y == y[:, :1]).all()), bool((drop.eval()(torch.ones(2, 4, 3)) == 1).all())
        (True, True)
    """

    def __init__(self, p: float = 0.5, *, batch_first: bool = True) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Expected `p` in [0, 1), but got {p!r}.")
        super().__init__(p)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with one dropout mask per sequence, broadcast along time."""
        return locked_dropout(x, self.p, training=self.training, batch_first=self.batch_first)

    def extra_repr(self) -> str:
        """Arguments shown in the module's repr."""
        return f"p={self.p}, batch_first={self.batch_first}"
