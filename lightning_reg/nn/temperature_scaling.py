"""A temperature-scaled model without Lightning: ``TemperatureScaled(model, T)(x) == model(x) / T``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_reg.functional.calibration import scale_logits

__all__ = ["TemperatureScaled"]


def _checked_temperature(temperature: float | Tensor) -> Tensor:
    t = torch.as_tensor(temperature, dtype=torch.float64).detach().clone()
    if t.ndim > 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(
            "Expected `temperature` to be a positive finite float or a 1-D tensor of them (one per class), "
            f"but got {temperature!r}."
        )
    return t


class TemperatureScaled(nn.Module):
    """A model whose logits are divided by a fitted temperature (Guo et al., 2017), in every mode.

    The plain ``nn.Module`` form of what :class:`~lightning_reg.TemperatureScaling` does inside Lightning:
    ``forward`` returns ``model(*args, **kwargs) / temperature``; when the model splits into
    ``forward_features``/``forward_head`` (the timm convention), both are offered and the head is scaled, so
    Monte-Carlo dropout's trunk-once path is calibrated too. The temperature is a buffer: it is in the
    ``state_dict`` and moves with ``.to()``.

    Args:
        model: the network returning logits ``(N, K)``.
        temperature: ``T > 0`` (a float), or ``(K,)`` temperatures from ``fit_temperature(..., per_class=True)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> scaled = TemperatureScaled(net, 2.0)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(scaled(x), net(x) / 2)
        True
    """

    temperature: Tensor

    def __init__(self, model: nn.Module, temperature: float | Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", _checked_temperature(temperature))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The model's logits divided by the temperature."""
        return self._scaled(self.model(*args, **kwargs), "forward")

    @property
    def forward_features(self) -> Callable[..., Any]:
        """The model's own ``forward_features`` (unscaled); absent when the model has none."""
        features = getattr(self.model, "forward_features", None)
        if not callable(features):
            raise AttributeError(f"{type(self.model).__name__} has no `forward_features`.")
        return features

    @property
    def forward_head(self) -> Callable[..., Tensor]:
        """The model's ``forward_head`` divided by the temperature; absent when the model has none."""
        head = getattr(self.model, "forward_head", None)
        if not callable(head):
            raise AttributeError(f"{type(self.model).__name__} has no `forward_head`.")

        def scaled_head(*args: Any, **kwargs: Any) -> Tensor:
            return self._scaled(head(*args, **kwargs), "forward_head")

        return scaled_head

    def _scaled(self, logits: Any, name: str) -> Tensor:
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"Expected the wrapped model's `{name}` to return a logits tensor, but got {type(logits).__name__}."
            )
        return scale_logits(logits, self.temperature)

    def extra_repr(self) -> str:
        """The temperature, in the module's repr."""
        t = self.temperature
        return f"temperature={float(t):.4g}" if t.ndim == 0 else f"temperature=({t.numel()} per class)"
