"""A dense classifier: blocks of Linear, BatchNorm or LayerNorm, ReLU and dropout (the Keras articles' first model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from torch import Tensor, nn

from zoo.classifier import ClassifierModule

__all__ = ["MLP", "MLPClassifier", "MLPNorm"]

MLPNorm = Literal["batch", "layer", "none"]
_NORMS: tuple[str, ...] = get_args(MLPNorm)


class MLP(nn.Module):
    """Dense blocks ``Linear -> norm -> ReLU -> Dropout`` on flattened inputs, then a linear classifier.

    Keras's ``Dense(256) -> BatchNormalization() -> Activation("relu") -> Dropout(0.2)``, repeated per width.
    The linear layer has no bias when a norm follows (the norm's shift replaces it). The last block's dropout
    sits in the head, so ``forward_features`` ends at its ReLU (the timm convention of the zoo). With
    ``norm="batch"`` dropout acts only there, after the last BatchNorm: dropout feeding a BatchNorm shifts its
    variance between train and eval (Li et al., CVPR 2019).

    Args:
        num_classes: output classes.
        in_features: features of a flattened input sample (64 for the 8x8 digits, 3072 for CIFAR-10).
        widths: units of each hidden block.
        norm: ``"batch"`` (``nn.BatchNorm1d``), ``"layer"`` (``nn.LayerNorm``) or ``"none"``.
        dropout: dropout after each hidden block (only before the classifier with ``norm="batch"``), in ``[0, 1)``.
        input_dropout: dropout on the flattened inputs, in ``[0, 1)``.

    Example:
        >>> import torch
        >>> MLP(10, in_features=64, widths=(32, 16))(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_features: int = 64,
        widths: Sequence[int] = (256, 128),
        norm: MLPNorm = "batch",
        dropout: float = 0.2,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"Expected `norm` to be one of {_NORMS}, but got {norm!r}.")
        if len(widths) == 0 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"Expected `widths` to be a non-empty sequence of positive ints, but got {widths!r}.")
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"Expected `in_features` and `num_classes` >= 1, but got {in_features!r}, {num_classes!r}."
            )
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")
        self.in_features = in_features
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        size = in_features
        for k, width in enumerate(widths):
            layers.append(nn.Linear(size, width, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers.append(nn.ReLU(inplace=True))
            # With BatchNorm, dropout between blocks would feed the next BatchNorm (variance shift, Li et al.,
            # CVPR 2019; the `dropout-before-bn` guard rail): then it acts only in the head, after the last BN.
            if k < len(widths) - 1 and dropout > 0 and norm != "batch":
                layers.append(nn.Dropout(dropout))
            size = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(size, num_classes))
        self.num_features = size

    def forward_features(self, x: Tensor) -> Tensor:
        """Features ``(N, widths[-1])`` of a batch ``(N, ...)`` with ``in_features`` values a sample."""
        if x.ndim < 2 or x[0].numel() != self.in_features:
            raise ValueError(
                f"Expected a batch (N, ...) of {self.in_features} features a sample (`in_features`), but got shape "
                f"{tuple(x.shape)}."
            )
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``: the last dropout, then the classifier."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


class MLPClassifier(ClassifierModule):
    """The zoo MLP as a LightningModule (see :class:`MLP` for the architecture arguments).

    ``**optim`` are :class:`~zoo.classifier.ClassifierModule`'s optimization arguments (``lr`` here defaults to 3e-3).

    Example:
        >>> import torch
        >>> model = MLPClassifier(num_classes=10, widths=(32,), norm="layer")
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_features: int = 64,
        widths: Sequence[int] = (256, 128),
        norm: MLPNorm = "batch",
        dropout: float = 0.2,
        input_dropout: float = 0.0,
        lr: float = 3e-3,
        **optim: Any,
    ) -> None:
        super().__init__(num_classes, lr=lr, **optim)
        self.save_hyperparameters()
        self.net = MLP(
            num_classes,
            in_features=in_features,
            widths=tuple(widths),
            norm=norm,
            dropout=dropout,
            input_dropout=input_dropout,
        )

    def forward_features(self, x: Tensor, *args: object) -> Tensor:
        """Features ``(N, widths[-1])``."""
        return self.net.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.net.forward_head(features)
