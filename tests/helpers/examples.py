"""Run an example script's `main` and keep what it trained, to check its reported numbers against."""

from __future__ import annotations

import importlib.util
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(stem: str, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[dict[str, float], list[tuple]]:
    """``examples/<stem>.py``'s ``main(**kwargs)``, and every ``(model, datamodule)`` passed to ``Trainer.fit``."""
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fits: list[tuple] = []
    real_fit = L.Trainer.fit

    def recording_fit(trainer: L.Trainer, model: L.LightningModule, *args: Any, **fit_kwargs: Any) -> None:
        fits.append((model, fit_kwargs.get("datamodule")))
        real_fit(trainer, model, *args, **fit_kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    return module.main(**kwargs), fits


def eval_logits(model: L.LightningModule, loader: Any, batches: int | None = None) -> tuple[Tensor, Tensor]:
    """Eval-mode float64 logits and the targets of the first ``batches`` batches of ``loader`` (all by default)."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for x, y in islice(loader, batches):
            parts.append((model(x).double(), y))
    model.train(was_training)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def accuracy(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(1) == targets).double().mean())
