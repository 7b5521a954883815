from __future__ import annotations

import pytest
import torch.nn.functional as F

from tests.helpers.examples import accuracy, eval_logits, run_example


def test_mc_dropout_example_reports_mc_and_deterministic_test_metrics(tmp_path, monkeypatch) -> None:
    metrics, fits = run_example("mc_dropout", monkeypatch, epochs=1, fast=True, root=tmp_path)
    ((model, data),) = fits
    # The deterministic pass is the trained model in eval mode, on the two test batches of `--fast`.
    logits, y = eval_logits(model, data.test_dataloader(), batches=2)
    assert metrics["mc/test/det_acc"] == pytest.approx(accuracy(logits, y), abs=1e-6)
    assert metrics["mc/test/det_nll"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
    assert 0.0 <= metrics["mc/test/acc"] <= 1.0
    assert metrics["mc/test/mutual_info"] > 0
    assert (tmp_path / "mc_dropout" / "reliability_test_epoch1.png").exists()
