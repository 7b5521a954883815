"""Calling the model on a batch: the one protocol of every callback that runs the model outside a step.

MC dropout, BN recalibration, temperature scaling and the guard rails' trace all need "the logits of this
batch" the way the user's own ``validation_step`` computes them, batch extras (sequence lengths, attention
masks) included. They get it here, in this order of precedence:

1. ``forward_fn(module, batch) -> logits``, passed to the callback: full control.
2. ``module.forward_inputs(batch)``, when the module defines it: the arguments of ``module.forward`` for this
   batch, a tuple (positional) or a dict (keyword). The zoo's modules define it (inputs and lengths).
3. ``module(batch[input_key])``.

Forms 2 and 3 give the arguments themselves, so a callback may also pass them to ``forward_features`` (MC
dropout runs the trunk once) or repeat them along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_reg._batch import BatchKey, get_entry

__all__ = ["ForwardFn", "ForwardInputs", "batch_inputs", "batch_logits", "validate_forward_fn"]

ForwardFn = Callable[[nn.Module, Any], Tensor]
"""``forward_fn(module, batch) -> logits``: how to compute the logits of a whole batch."""


class ForwardInputs:
    """The arguments of ``module.forward`` for one batch: ``module(*args, **kwargs)``.

    Args:
        args: positional arguments.
        kwargs: keyword arguments.

    Example:
        >>> import torch
        >>> inputs = ForwardInputs((torch.zeros(2, 3),), {})
        >>> inputs.batch_size
        2
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs

    def __call__(self, fn: Callable[..., Any]) -> Any:
        """``fn(*args, **kwargs)``."""
        return fn(*self.args, **self.kwargs)

    def tensors(self) -> list[Tensor]:
        """Every tensor among the arguments, positional first."""
        values = [*self.args, *self.kwargs.values()]
        return [v for v in values if isinstance(v, Tensor)]

    @property
    def batch_size(self) -> int:
        """The first dimension of the first tensor argument."""
        tensors = self.tensors()
        if not tensors or tensors[0].dim() == 0:
            raise ValueError("The forward inputs hold no batched tensor: cannot tell the batch size.")
        return int(tensors[0].shape[0])

    def map(self, fn: Callable[[Tensor], Tensor]) -> ForwardInputs:
        """The same arguments with ``fn`` applied to every tensor among them (e.g. repeat along the batch)."""

        def apply(value: Any) -> Any:
            return fn(value) if isinstance(value, Tensor) else value

        return ForwardInputs(tuple(apply(v) for v in self.args), {k: apply(v) for k, v in self.kwargs.items()})


def batch_inputs(module: nn.Module, batch: Any, input_key: BatchKey = 0) -> ForwardInputs:
    """The arguments of ``module.forward`` for ``batch``: ``module.forward_inputs(batch)`` or ``batch[input_key]``.

    Args:
        module: the model; it may define ``forward_inputs(batch)`` returning a tuple or a dict of arguments.
        batch: a batch as the dataloader gives it (a bare tensor is the inputs themselves).
        input_key: where the inputs are, for modules without ``forward_inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> inputs = batch_inputs(nn.Linear(3, 2), [torch.zeros(4, 3), torch.zeros(4)])
        >>> inputs(nn.Linear(3, 2)).shape
        torch.Size([4, 2])
    """
    method = getattr(module, "forward_inputs", None)
    if method is None:
        inputs = batch if isinstance(batch, Tensor) else get_entry(batch, input_key, "input_key")
        return ForwardInputs((inputs,), {})
    value = method(batch)
    if isinstance(value, Mapping):
        return ForwardInputs((), dict(value))
    if isinstance(value, tuple | list):
        return ForwardInputs(tuple(value), {})
    if isinstance(value, Tensor):
        return ForwardInputs((value,), {})
    raise TypeError(
        f"Expected `{type(module).__name__}.forward_inputs(batch)` to return a tuple (positional arguments of "
        f"`forward`), a dict (keyword arguments) or a tensor, but got {type(value).__name__}."
    )


def batch_logits(
    module: nn.Module, batch: Any, *, forward_fn: ForwardFn | None = None, input_key: BatchKey = 0
) -> Tensor:
    """The logits of ``batch``: ``forward_fn(module, batch)``, else ``module(*batch_inputs(module, batch))``.

    Args:
        module: the model.
        batch: a batch as the dataloader gives it.
        forward_fn: ``forward_fn(module, batch) -> logits``; overrides the module's ``forward_inputs``.
        input_key: where the inputs are, for modules without ``forward_inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> batch_logits(nn.Linear(3, 2), {"x": torch.zeros(4, 3)}, input_key="x").shape
        torch.Size([4, 2])
    """
    if forward_fn is not None:
        logits = forward_fn(module, batch)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"Expected `forward_fn(module, batch)` to return the logits as a tensor, but got "
                f"{type(logits).__name__}. Return the logits only (not a loss, a tuple or a model output object)."
            )
        return logits
    return batch_inputs(module, batch, input_key)(module)


def validate_forward_fn(forward_fn: object) -> None:
    """Raise ``TypeError`` unless ``forward_fn`` is ``None`` or callable."""
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            "Expected `forward_fn` to be None or a callable `forward_fn(module, batch) -> logits`, "
            f"but got {type(forward_fn).__name__}."
        )
