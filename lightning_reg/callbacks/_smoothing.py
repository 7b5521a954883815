"""Smoothing once: the check that no two things smooth the labels (see docs/label_smoothing.md)."""

from __future__ import annotations

import lightning as L
from torch import nn


def _module_loss_smoothing(pl_module: L.LightningModule) -> list[str]:
    """Losses held by the module that smooth labels themselves: ``nn.CrossEntropyLoss(label_smoothing>0)``, timm's."""
    found = []
    for name, module in pl_module.named_modules():
        if isinstance(module, nn.CrossEntropyLoss) and module.label_smoothing > 0:
            loss = f"CrossEntropyLoss(label_smoothing={module.label_smoothing})"
            found.append(f"{type(pl_module).__name__}.{name} = {loss}")
        elif type(module).__name__ == "LabelSmoothingCrossEntropy" and getattr(module, "smoothing", 0) > 0:
            found.append(f"{type(pl_module).__name__}.{name} = {type(module).__name__}(smoothing={module.smoothing})")
    return found


def check_single_smoothing(callback_sources: list[str], pl_module: L.LightningModule) -> None:
    """Raise ``ValueError`` when more than one thing would smooth the labels.

    ``callback_sources`` names the callbacks that smooth (a ``LabelSmoothing``, a mixing callback's
    ``label_smoothing``); the module adds its ``label_smoothing`` attribute and a smoothing loss it holds
    (``nn.CrossEntropyLoss(label_smoothing>0)``, timm's ``LabelSmoothingCrossEntropy``), which would smooth the
    probability targets a callback hands it once more.
    """
    sources = list(callback_sources)
    if sources:
        module_smoothing = getattr(pl_module, "label_smoothing", 0.0)
        if isinstance(module_smoothing, int | float) and module_smoothing > 0:
            sources.append(f"{type(pl_module).__name__}.label_smoothing={module_smoothing}")
        sources += _module_loss_smoothing(pl_module)
    if len(sources) > 1:
        raise ValueError(
            f"Labels would be smoothed more than once, by {', '.join(sources)}. Keep exactly one: a "
            "`LabelSmoothing` callback (it composes with mixing in either order), or `label_smoothing=` of the "
            "mixing callback, or the module's own smoothing (its `label_smoothing`, or its loss's)."
        )
