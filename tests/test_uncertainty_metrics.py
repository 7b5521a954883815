from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_reg import plot_reliability
from lightning_reg.functional.uncertainty import (
    brier_score,
    entropy,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from lightning_reg.metrics import UncertaintyMetrics


def _predictions(n: int = 200, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(n, k, generator=g)).softmax(-1)
    targets = torch.randint(0, k, (n,), generator=g)
    return probs, targets


def test_formulas_match_independent_references() -> None:
    probs, targets = _predictions()
    torch.testing.assert_close(
        negative_log_likelihood(probs, targets), F.nll_loss(probs.log(), targets, reduction="none")
    )
    one_hot = F.one_hot(targets, 4).float()
    torch.testing.assert_close(brier_score(probs, targets), ((probs - one_hot) ** 2).sum(1))
    torch.testing.assert_close(entropy(probs), torch.distributions.Categorical(probs=probs).entropy())


def test_ece_from_bins_equals_torchmetrics_including_confidence_one() -> None:
    probs, targets = _predictions()
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # torchmetrics keeps confidence 1 in a bin of its own
    bins = reliability_bins(probs, targets, n_bins=10)
    expected = multiclass_calibration_error(probs, targets, num_classes=4, n_bins=10, norm="l1")
    torch.testing.assert_close(expected_calibration_error(bins), expected)
    assert bins[0].sum() == 200


def test_metrics_over_batches_equal_metrics_on_everything() -> None:
    probs, targets = _predictions()
    whole, batched = UncertaintyMetrics(4, n_bins=10), UncertaintyMetrics(4, n_bins=10)
    whole.update(probs, targets, torch.ones(200))
    for chunk in range(0, 200, 64):
        batched.update(
            probs[chunk : chunk + 64], targets[chunk : chunk + 64], torch.ones(len(probs[chunk : chunk + 64]))
        )
    a, b = whole.compute(), batched.compute()
    assert a.keys() == b.keys() == {"acc", "nll", "brier", "ece", "entropy", "mutual_info"}
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    torch.testing.assert_close(a["nll"], F.nll_loss(probs.log(), targets))
    torch.testing.assert_close(a["ece"], expected_calibration_error(whole.reliability()))
    whole.reset()
    whole.update(probs, targets)  # a deterministic prediction: no mutual information
    assert "mutual_info" not in whole.compute()


def test_plot_reliability_writes_a_png_and_returns_the_ece(tmp_path: Path) -> None:
    probs, targets = _predictions()
    ece = plot_reliability(probs, targets, tmp_path / "sub" / "reliability.png", n_bins=10)
    assert (tmp_path / "sub" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    torch.testing.assert_close(ece, multiclass_calibration_error(probs, targets, num_classes=4, n_bins=10))


def test_bad_shapes_and_bins_raise() -> None:
    probs, targets = _predictions()
    with pytest.raises(ValueError, match=r"Expected probabilities of shape \(N, K\)"):
        negative_log_likelihood(probs[0], targets)
    with pytest.raises(ValueError, match=r"Expected class-index targets of shape \(200,\)"):
        brier_score(probs, targets[:3])
    with pytest.raises(ValueError, match="Expected `n_bins` to be a positive int, but got 0"):
        reliability_bins(probs, targets, n_bins=0)
