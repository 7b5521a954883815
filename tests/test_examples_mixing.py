import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("stem", ["mixup", "cutmix", "label_smoothing"])
def test_example_runs_and_reports_validation_metrics(stem):
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(epochs=2, fast=True)
    assert 0.0 <= metrics["val_acc"] <= 1.0
    assert metrics["train_loss_epoch"] > 0
