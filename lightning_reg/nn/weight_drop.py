"""The module form of DropConnect on the weights of a wrapped module (the weight-dropped LSTM)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.func import functional_call

from lightning_reg.functional.weight_drop import weight_drop

__all__ = ["WeightDrop"]


class WeightDrop(nn.Module):
    """DropConnect on named weights of a wrapped module, drawn afresh at every forward pass in training.

    By default it drops the hidden-to-hidden matrices (``weight_hh_*``) of an ``nn.LSTM``/``nn.GRU``/``nn.RNN``:
    the weight-dropped LSTM of `AWD-LSTM <https://arxiv.org/abs/1708.02182>`_. The dropped weights are passed
    to the module with ``torch.func.functional_call``, so the module's parameters are never replaced and the
    fused kernel (cuDNN on GPU) still runs: this is the fast alternative to Keras' ``recurrent_dropout``,
    which needs a step-by-step loop. In eval mode the module runs with its own weights.

    Args:
        module: the module to wrap.
        weights: names of the parameters to drop (``module.named_parameters()`` names); by default every
            ``weight_hh_*`` parameter.
        p: probability of dropping a weight, in ``[0, 1)``.

    Example:
        >>> import torch
        >>> lstm = WeightDrop(nn.LSTM(4, 8, batch_first=True), p=0.5)
        >>> lstm.weights
        ('weight_hh_l0',)
        >>> out, _ = lstm(torch.randn(2, 3, 4))
        >>> tuple(out.shape)
        (2, 3, 8)
    """

    def __init__(self, module: nn.Module, weights: Sequence[str] | None = None, *, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Expected `p` in [0, 1), but got {p!r}.")
        available = [name for name, _ in module.named_parameters()]
        if weights is None:
            weights = [name for name in available if name.split(".")[-1].startswith("weight_hh")]
            if not weights:
                raise ValueError(
                    f"{type(module).__name__} has no `weight_hh_*` parameters to drop; pass `weights` with names "
                    f"from {available}."
                )
        unknown = [name for name in weights if name not in available]
        if unknown:
            raise ValueError(f"Expected `weights` to name parameters of the module {available}, but got {unknown}.")
        self.module = module
        self.weights = tuple(weights)
        self.p = p

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output, computed with freshly dropped weights in training mode."""
        if not self.training or self.p == 0.0:
            return self.module(*args, **kwargs)
        dropped = {name: weight_drop(self.module.get_parameter(name), self.p) for name in self.weights}
        with warnings.catch_warnings():
            # On GPU, torch warns that the weights are not one contiguous chunk and copies them into one for the
            # cuDNN call: that copy is the price of a new mask per pass, expected here.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            return functional_call(self.module, dropped, args, kwargs)

    def extra_repr(self) -> str:
        """Arguments shown in the module's repr."""
        return f"weights={self.weights}, p={self.p}"
