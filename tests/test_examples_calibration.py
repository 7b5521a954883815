from __future__ import annotations

import pytest
import torch.nn.functional as F

from tests.helpers.examples import eval_logits, run_example


def test_calibration_example_fits_the_nll_minimising_temperature_and_tests_at_it(tmp_path, monkeypatch) -> None:
    metrics, fits = run_example("calibration", monkeypatch, epochs=1, fast=True, root=tmp_path)
    ((model, data),) = fits
    t = metrics["temperature"]
    # T minimises the validation NLL (TemperatureScaling's default split) of the trained model ...
    val_logits, val_y = eval_logits(model, data.val_dataloader())
    nll = {f: float(F.cross_entropy(val_logits / (t * f), val_y)) for f in (1 / 1.05, 1.0, 1.05)}
    assert nll[1.0] <= min(nll[1 / 1.05], nll[1.05]), (t, nll)
    # ... and the test loss is the NLL of the logits divided by T, on the two test batches of `--fast`.
    test_logits, test_y = eval_logits(model, data.test_dataloader(), batches=2)
    assert metrics["test_loss"] == pytest.approx(float(F.cross_entropy(test_logits / t, test_y)), rel=1e-4)
