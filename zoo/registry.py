"""The zoo's registry: an explicit dict from model name to constructor, plus every timm model name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from typing import Any

import timm

from zoo.classifier import ClassifierModule
from zoo.cnn import CNNClassifier
from zoo.image_classifier import ImageClassifier
from zoo.mlp import MLPClassifier
from zoo.rnn import RNNClassifier
from zoo.transformer import TransformerClassifier

__all__ = ["MODELS", "create", "list_models"]

MODELS: dict[str, Callable[..., ClassifierModule]] = {
    # Dense blocks (Linear-BN-ReLU-Dropout) on flattened inputs: 64 features for the 8x8 digits by default.
    "mlp": MLPClassifier,
    # Conv-BN-ReLU CNNs; the defaults fit 8x8 digits (in_channels=1), any size works (global pooling).
    "cnn_small": partial(CNNClassifier, widths=(32, 64), depth=1),
    "cnn": partial(CNNClassifier, widths=(32, 64, 128), depth=2),
    # A timm backbone for fine-tuning; any other timm name also works in `create`.
    "resnet18": partial(ImageClassifier, backbone="resnet18"),
    # Recurrent and attention models for sequences of vectors (digits rows by default) or token ids.
    "lstm": partial(RNNClassifier, cell="lstm"),
    "gru": partial(RNNClassifier, cell="gru"),
    "transformer": TransformerClassifier,
    # ViT-Tiny's widths (192 wide, 12 blocks, 3 heads) on 32x32 RGB images in 4x4 patches.
    "vit_tiny": partial(
        TransformerClassifier,
        image_size=32,
        patch_size=4,
        in_channels=3,
        dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4.0,
        drop_path=0.1,
    ),
}


def list_models() -> list[str]:
    """Names of the zoo's own models, sorted (``create`` also takes any ``timm.list_models()`` name).

    Example:
        >>> list_models()
        ['cnn', 'cnn_small', 'gru', 'lstm', 'mlp', 'resnet18', 'transformer', 'vit_tiny']
    """
    return sorted(MODELS)


def create(name: str, **kwargs: Any) -> ClassifierModule:
    """Build the zoo model ``name``; ``kwargs`` override its defaults (e.g. ``num_classes``).

    A name that is not in :data:`MODELS` but is a timm model builds ``ImageClassifier(backbone=name, **kwargs)``.

    Raises:
        ValueError: for a name that is neither, listing the closest known names.

    Example:
        >>> model = create("cnn_small", num_classes=3)
        >>> model.num_classes
        3
        >>> create("test_resnet", num_classes=3).hparams.backbone
        'test_resnet'
    """
    if name in MODELS:
        return MODELS[name](**kwargs)
    if timm.is_model(name):
        return ImageClassifier(backbone=name, **kwargs)
    close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"Unknown zoo model {name!r}.{hint} Known models: {', '.join(list_models())}, or any `timm.list_models()` name."
    )
