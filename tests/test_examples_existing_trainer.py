import pytest

from tests.helpers.examples import accuracy, eval_logits, run_example


def test_existing_trainer_example_trains_with_every_callback_and_reports_mc_metrics(monkeypatch):
    metrics, fits = run_example("existing_trainer", monkeypatch, epochs=1, limit_batches=3)
    ((model, data),) = fits
    # The user's own test_acc, recomputed over the whole test set (test batches are not limited).
    logits, y = eval_logits(model, data.test_dataloader())
    assert metrics["test_acc"] == pytest.approx(accuracy(logits, y), abs=1e-6)
    # MCDropoutEvaluation adds its metrics to the user's own test run; its deterministic pass is that model's.
    for name in ("acc", "nll", "ece", "brier", "mutual_info", "det_acc"):
        assert f"mc/test/{name}" in metrics
    assert metrics["mc/test/det_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert metrics["mc/test/mutual_info"] >= 0.0
