from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "calibration.py"


def test_calibration_example_fits_a_temperature_and_tests_the_calibrated_model(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("example_calibration", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(epochs=1, fast=True, root=tmp_path)
    assert 0.01 <= metrics["temperature"] <= 100.0
    assert metrics["test_loss"] > 0
