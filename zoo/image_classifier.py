"""Any timm image model as a classifier for training or fine-tuning: local weights, frozen backbone or BN."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.classifier import ClassifierModule, _decay_split

__all__ = ["ImageClassifier", "load_backbone_weights"]

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Prefixes under which a state dict may hold the timm model: ours (`ImageClassifier.net`), DDP, common wrappers.
_PREFIXES = ("net.", "module.", "model.", "backbone.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(
            f"Expected `pretrained` to be a weights file ending in one of {_WEIGHT_SUFFIXES}, but got {str(path)!r}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {str(path)!r}; pass an existing `.safetensors`/`.pth`/`.ckpt`.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a Lightning checkpoint, or a training script's {"state_dict": ...}
    if not isinstance(loaded, dict):
        raise ValueError(f"Expected {str(path)!r} to hold a state dict, but it holds a {type(loaded).__name__}.")
    return loaded


def _strip_prefix(state: dict[str, Tensor], own_keys: set[str]) -> dict[str, Tensor]:
    if own_keys & state.keys():
        return state
    for prefix in _PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if own_keys & stripped.keys():
            return stripped
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict into a timm ``model``, keeping its own classifier where the shapes differ.

    Reads ``.safetensors`` files, ``torch.save``-d state dicts (``.pth``, ``.pt``, ``.bin``) and Lightning
    checkpoints (``.ckpt``, e.g. of an :class:`ImageClassifier`, whose ``net.`` prefix is removed). Classifier
    weights whose shapes do not match (another number of classes) are skipped, so the new head starts fresh;
    any other mismatch, missing or unexpected key is an error.

    Returns:
        The names of the skipped classifier weights.

    Example:
        >>> import tempfile
        >>> source = timm.create_model("test_resnet", num_classes=10)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save(source.state_dict(), f"{tmp}/weights.pth")
        ...     target = timm.create_model("test_resnet", num_classes=3)
        ...     load_backbone_weights(target, f"{tmp}/weights.pth")
        ['fc.weight', 'fc.bias']
    """
    own = model.state_dict()
    state = _strip_prefix(_read_state_dict(Path(path)), set(own))
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    classifier_names = classifier if isinstance(classifier, list | tuple) else [classifier]
    skipped, mismatched = [], []
    for key in list(state):
        if key in own and state[key].shape != own[key].shape:
            if any(name and key.startswith(f"{name}.") for name in classifier_names):
                skipped.append(key)
                del state[key]
            else:
                mismatched.append(f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}")
    if mismatched:
        raise ValueError(f"The weights in {str(path)!r} do not fit the model (file vs model): {mismatched}.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {str(path)!r} are for another architecture: missing {missing[:8]}, unexpected "
            f"{result.unexpected_keys[:8]} (first 8 of each). Check the `backbone` name."
        )
    return skipped


class ImageClassifier(ClassifierModule):
    """A timm image model (any ``timm.list_models()`` name) as a zoo classifier, built for fine-tuning.

    Args:
        num_classes: classes of the new head.
        backbone: the timm model name.
        pretrained: ``False`` (random init), ``True`` (timm's hub download; needs a network), or the path of a
            local weights file: a ``.safetensors``/``.pth`` state dict or a Lightning ``.ckpt`` (see
            :func:`load_backbone_weights`). A head of another size is replaced by a fresh one. Not saved in the
            hyperparameters: a checkpoint holds all weights, so ``load_from_checkpoint`` needs neither the file
            nor the network.
        in_channels: input channels (timm adapts the stem).
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        drop_path_rate: stochastic depth (timm's ``drop_path_rate``; only for models that support it).
        freeze_backbone: train only the classifier; every other parameter gets ``requires_grad=False``.
        freeze_bn: keep every batch-norm layer in eval mode (normalizing with its running statistics, which no
            longer change) with its affine weights frozen, while the rest trains: the usual way to fine-tune
            with small batches. (Lightning's ``BaseFinetuning.freeze(train_bn=False)`` instead stops tracking
            and normalizes with batch statistics.)
        backbone_lr_scale: the backbone's learning rate is ``lr * backbone_lr_scale``, the head's is ``lr``. By
            default 0.1 with pretrained weights and 1.0 without.
        **optim: :class:`~zoo.classifier.ClassifierModule`'s optimization arguments (``lr``, ``weight_decay``, ...).

    Example:
        >>> model = ImageClassifier(num_classes=3, backbone="test_resnet", freeze_bn=True)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3])
        >>> any(m.training for m in model.train().modules() if isinstance(m, nn.BatchNorm2d))
        False
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        backbone: str = "resnet18",
        pretrained: bool | str | Path = False,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_backbone: bool = False,
        freeze_bn: bool = False,
        backbone_lr_scale: float | None = None,
        **optim: Any,
    ) -> None:
        super().__init__(num_classes, **optim)
        self.save_hyperparameters(ignore=["pretrained"])
        if not timm.is_model(backbone):
            raise ValueError(
                f"Expected `backbone` to be a timm model name (see `timm.list_models()`), but got {backbone!r}."
            )
        for name, p in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")
        if backbone_lr_scale is not None and not backbone_lr_scale > 0:
            raise ValueError(f"Expected `backbone_lr_scale` > 0 (or None), but got {backbone_lr_scale!r}.")
        extra: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
        # `Any`: timm's models have `get_classifier`/`forward_head`, which `nn.Module` does not declare.
        self.net: Any = timm.create_model(
            backbone,
            pretrained=pretrained is True,
            num_classes=num_classes,
            in_chans=in_channels,
            drop_rate=drop_rate,
            **extra,
        )
        if isinstance(pretrained, str | Path):
            load_backbone_weights(self.net, pretrained)
        elif not isinstance(pretrained, bool):
            raise ValueError(f"Expected `pretrained` to be a bool or a file path, but got {pretrained!r}.")
        self.backbone_lr_scale = (
            backbone_lr_scale if backbone_lr_scale is not None else (1.0 if pretrained is False else 0.1)
        )
        self.freeze_bn = freeze_bn
        head_ids = {id(p) for p in self._head().parameters()}
        if freeze_backbone:
            for param in self.net.parameters():
                if id(param) not in head_ids:
                    param.requires_grad_(False)
        if freeze_bn:
            for module in self._batch_norms():
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
            self.train(self.training)

    def _head(self) -> nn.Module:
        return cast(nn.Module, self.net.get_classifier())

    def _batch_norms(self) -> list[_BatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, _BatchNorm)]

    def train(self, mode: bool = True) -> ImageClassifier:
        """Set the training mode; with ``freeze_bn`` the batch-norm layers stay in eval mode."""
        super().train(mode)
        if getattr(self, "freeze_bn", False):
            for module in self._batch_norms():
                module.eval()
        return self

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The backbone's unpooled features (timm's ``forward_features``)."""
        return self.net.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Pooling, ``drop_rate`` dropout and the classifier (timm's ``forward_head``)."""
        return self.net.forward_head(features)

    def parameter_groups(self) -> Iterable[dict[str, Any]]:
        """Head at ``lr``, backbone at ``lr * backbone_lr_scale``; each split into decayed and undecayed."""
        head = self._head()
        head_ids = {id(p) for p in head.parameters()}
        head_decay, head_no_decay = _decay_split(head)
        decay, no_decay = _decay_split(self.net)
        backbone_lr = self.lr * self.backbone_lr_scale
        return [
            {
                "params": [p for p in decay if id(p) not in head_ids],
                "weight_decay": self.weight_decay,
                "lr": backbone_lr,
            },
            {"params": [p for p in no_decay if id(p) not in head_ids], "weight_decay": 0.0, "lr": backbone_lr},
            {"params": head_decay, "weight_decay": self.weight_decay, "lr": self.lr},
            {"params": head_no_decay, "weight_decay": 0.0, "lr": self.lr},
        ]
