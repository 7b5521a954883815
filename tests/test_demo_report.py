"""The demo's Markdown report names every run whose temperature could not be identified from the validation split."""

from pathlib import Path

import pytest
import torch

from lightning_reg.demo import DemoResult, Measurement, _markdown_report
from lightning_reg.functional import fit_temperature


def _result(temperatures: dict[tuple[str, int], float]) -> DemoResult:
    m = [Measurement("lstm", recipe, seed, "temperature", t) for (recipe, seed), t in temperatures.items()]
    return DemoResult(m, {"lstm": "MixUp + LabelSmoothing"}, (0, 1, 2), Path("out"))


def test_a_validation_split_without_errors_drives_the_temperature_to_its_bound() -> None:
    # The premise of the note: every validation prediction right, so the NLL falls monotonically as T -> 0.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.5, 0.5]])
    y = logits.argmax(1)
    with pytest.warns(UserWarning, match="min_temperature"):
        assert fit_temperature(logits, y, min_temperature=1e-2, distributed=False) == 1e-2


def test_the_report_lists_the_seeds_whose_temperature_is_at_the_bound() -> None:
    result = _result({("plain", 0): 0.46, ("regularized", 0): 0.01, ("regularized", 1): 0.16, ("regularized", 2): 0.01})
    assert result.temperatures_at_bound() == {("lstm", "regularized"): [0, 2]}
    report = _markdown_report(result)
    assert "lower bound 0.01" in report
    assert "lstm regularized: seed(s) 0, 2." in report


def test_the_report_says_nothing_of_bounds_when_every_temperature_was_identified() -> None:
    result = _result({("plain", 0): 0.46, ("regularized", 0): 0.12})
    assert result.temperatures_at_bound() == {}
    assert "lower bound" not in _markdown_report(result)
