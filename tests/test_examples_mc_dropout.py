from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mc_dropout.py"


def test_mc_dropout_example_reports_mc_and_deterministic_test_metrics(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("example_mc_dropout", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(epochs=1, fast=True, root=tmp_path)
    assert 0.0 <= metrics["mc/test/acc"] <= 1.0
    assert 0.0 <= metrics["mc/test/det_ece"] <= 1.0
    assert metrics["mc/test/mutual_info"] > 0
    assert (tmp_path / "mc_dropout" / "reliability_test_epoch1.png").exists()
