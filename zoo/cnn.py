"""Convolutional classifiers: conv-norm-activation blocks, pooling, spatial and head dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from torch import Tensor, nn

from zoo.classifier import ClassifierModule

__all__ = ["CNN", "CNNClassifier", "Norm", "make_norm2d"]

Norm = Literal["batch", "instance", "layer", "group", "none"]
_NORMS: tuple[str, ...] = get_args(Norm)


def make_norm2d(norm: Norm, channels: int) -> nn.Module:
    """The normalization layer for ``channels`` feature maps.

    ``"layer"`` normalizes over (C, H, W) per sample (``GroupNorm`` with one group), ``"group"`` over groups
    of up to 8 channels, ``"instance"`` over (H, W) per channel with a learned affine.

    Example:
        >>> norm = make_norm2d("layer", 16)
        >>> type(norm).__name__, norm.num_groups
        ('GroupNorm', 1)
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"Expected `norm` to be one of {_NORMS}, but got {norm!r}.")


class CNN(nn.Module):
    """A plain CNN of conv3x3-norm-ReLU blocks, pooling, and a dropout + linear head.

    Each stage has ``depth`` blocks and all but the last end in 2x2 max pooling; global average pooling
    then feeds the head.

    Args:
        num_classes: output classes.
        in_channels: input channels (1 for digits and MNIST, 3 for CIFAR).
        widths: channels of each stage; the spatial size halves between stages.
        depth: conv blocks per stage.
        norm: normalization after each convolution.
        spatial_dropout: ``Dropout2d`` rate after each stage (drops whole feature maps); 0 disables it.
        dropout: dropout rate before the classifier.

    Example:
        >>> import torch
        >>> CNN(10, widths=(8, 16))(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64),
        depth: int = 1,
        norm: Norm = "batch",
        spatial_dropout: float = 0.0,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"Expected `norm` to be one of {_NORMS}, but got {norm!r}.")
        if len(widths) == 0 or any(w < 1 for w in widths):
            raise ValueError(f"Expected `widths` to be a non-empty sequence of positive ints, but got {widths!r}.")
        if depth < 1:
            raise ValueError(f"Expected `depth` >= 1, but got {depth!r}.")
        for name, p in (("spatial_dropout", spatial_dropout), ("dropout", dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            for _ in range(depth):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                    make_norm2d(norm, width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            if spatial_dropout > 0:
                layers.append(nn.Dropout2d(spatial_dropout))
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        self.num_features = channels

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(N, widths[-1])``."""
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


class CNNClassifier(ClassifierModule):
    """The zoo CNN as a LightningModule (see :class:`CNN` for the architecture arguments).

    ``**optim`` are :class:`~zoo.classifier.ClassifierModule`'s optimization arguments (``lr`` here defaults to 3e-3).

    Example:
        >>> import torch
        >>> model = CNNClassifier(num_classes=10, widths=(8, 16))
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64),
        depth: int = 1,
        norm: Norm = "batch",
        spatial_dropout: float = 0.0,
        dropout: float = 0.3,
        lr: float = 3e-3,
        **optim: Any,
    ) -> None:
        super().__init__(num_classes, lr=lr, **optim)
        self.save_hyperparameters()
        self.net = CNN(
            num_classes,
            in_channels=in_channels,
            widths=tuple(widths),
            depth=depth,
            norm=norm,
            spatial_dropout=spatial_dropout,
            dropout=dropout,
        )

    def forward_features(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """Pooled features ``(N, widths[-1])``."""
        return self.net.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.net.forward_head(features)
