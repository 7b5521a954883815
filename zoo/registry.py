"""The zoo's registry: an explicit dict from model name to constructor."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from typing import Any

from zoo.classifier import ClassifierModule
from zoo.cnn import CNNClassifier

__all__ = ["MODELS", "create", "list_models"]

MODELS: dict[str, Callable[..., ClassifierModule]] = {
    "cnn_small": partial(CNNClassifier, widths=(32, 64), depth=1),
    "cnn": partial(CNNClassifier, widths=(32, 64, 128), depth=2),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted.

    Example:
        >>> "cnn_small" in list_models()
        True
    """
    return sorted(MODELS)


def create(name: str, **kwargs: Any) -> ClassifierModule:
    """Build the zoo model ``name``; ``kwargs`` override its defaults (e.g. ``num_classes``).

    Raises:
        ValueError: for an unknown name, listing the closest known names.

    Example:
        >>> model = create("cnn_small", num_classes=3)
        >>> model.num_classes
        3
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown zoo model {name!r}.{hint} Known models: {', '.join(list_models())}.")
    return MODELS[name](**kwargs)
