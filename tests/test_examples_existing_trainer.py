import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(stem: str):
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_existing_trainer_example_trains_with_every_callback_and_reports_mc_metrics():
    metrics = _load("existing_trainer").main(epochs=1, limit_batches=3)
    assert 0.0 <= metrics["test_acc"] <= 1.0
    # MCDropoutEvaluation adds its metrics to the user's own test run, next to the deterministic pass.
    for name in ("acc", "nll", "ece", "brier", "mutual_info", "det_acc"):
        assert f"mc/test/{name}" in metrics
    assert metrics["mc/test/mutual_info"] >= 0.0
