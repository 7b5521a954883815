"""`MCDropoutEvaluation(masks=...)`: the threshold masks during sampling only, torch's dropout in training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_reg import MCDropoutEvaluation
from lightning_reg.functional import mc_masks
from tests.helpers import TinyMLP, UserClassifier, fast_trainer, make_classification, make_loader


class _Recorder(UserClassifier):
    """Records, at each training step, whether any dropout had its forward replaced."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(TinyMLP(batch_norm=True, dropout=0.3))
        self.replaced_in_training: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.replaced_in_training.append(any("forward" in vars(m) for m in self.modules()))
        return super().training_step(batch, batch_idx)


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = mc_masks._threshold_dropout

    def counting(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mc_masks, "_threshold_dropout", counting)
    return calls


def test_training_keeps_torchs_dropout_and_validation_samples_threshold_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_calls(monkeypatch)
    loader = make_loader(*make_classification(32), batch_size=16)
    losses = []
    for masks in ("threshold", "torch"):
        model = _Recorder()
        callback = MCDropoutEvaluation(4, plot=False, masks=masks)  # type: ignore[arg-type]
        before = len(calls)
        fast_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, loader, loader)
        assert model.replaced_in_training == [False] * 4
        assert not any("forward" in vars(m) for m in model.modules())
        # 2 validations of 2 batches, 4 samples each, one dropout layer (none with torch's masks)
        assert len(calls) - before == (16 if masks == "threshold" else 0)
        losses.append(model.train_losses)
    assert losses[0] == losses[1]  # training is the same with either mask source


def test_predictions_with_either_mask_source_are_valid_and_differ(tmp_path: Path) -> None:
    inputs, _ = make_classification(32)
    loader = make_loader(inputs, torch.zeros(32, dtype=torch.long), batch_size=16)
    results = {}
    for masks in ("threshold", "torch"):
        torch.manual_seed(0)
        model = UserClassifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)))
        callback = MCDropoutEvaluation(8, plot=False, masks=masks)  # type: ignore[arg-type]
        fast_trainer(tmp_path, callbacks=[callback]).predict(model, loader)
        probs = torch.cat([p["mc_mean_probs"] for p in callback.predictions])
        torch.testing.assert_close(probs.sum(-1), torch.ones(32))
        assert (torch.cat([p["mc_mutual_information"] for p in callback.predictions]) > 0).any()
        results[masks] = probs
    assert not torch.equal(results["threshold"], results["torch"])


def test_bad_masks_raise_listing_the_options() -> None:
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'threshold'\), but got 'x'"):
        MCDropoutEvaluation(masks="x")  # type: ignore[arg-type]
