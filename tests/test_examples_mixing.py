import pytest

from tests.helpers.examples import accuracy, eval_logits, run_example


@pytest.mark.parametrize("stem", ["mixup", "cutmix", "label_smoothing"])
def test_example_reports_the_validation_accuracy_of_the_model_it_trained(stem, monkeypatch):
    metrics, fits = run_example(stem, monkeypatch, epochs=2, fast=True)
    ((model, data),) = fits
    # `--fast` validates on one batch; the last validation ran on the weights that fit returned.
    logits, y = eval_logits(model, data.val_dataloader(), batches=1)
    assert metrics["val_acc"] == pytest.approx(accuracy(logits, y), abs=1e-6)
    assert metrics["train_loss_epoch"] > 0
