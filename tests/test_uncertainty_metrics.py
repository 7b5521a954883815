from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.utilities.data import dim_zero_sum

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


def test_ece_equals_a_hand_computation_and_torchmetrics_functional() -> None:
    # Confidences 0.9, 0.8 (bin [0.5, 1)) and 0.6, 0.7 in 2 bins of width 0.5: all four land in the upper bin.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    targets = torch.tensor([0, 0, 0, 1])  # correct, wrong, correct, correct
    metrics = UncertaintyMetrics(2, n_bins=2)
    metrics.update(probs, targets)
    by_hand = abs(3 / 4 - (0.9 + 0.8 + 0.6 + 0.7) / 4)  # one bin holds all: |accuracy - mean confidence|
    torch.testing.assert_close(metrics.compute()["ece"], torch.tensor(by_hand))
    for n_bins in (2, 7, 15):
        big, big_targets = _predictions(n=500, k=5, seed=n_bins)
        metrics = UncertaintyMetrics(5, n_bins=n_bins)
        for p, t in zip(big.split(128), big_targets.split(128), strict=True):
            metrics.update(p, t)
        expected = multiclass_calibration_error(big, big_targets, num_classes=5, n_bins=n_bins, norm="l1")
        torch.testing.assert_close(metrics.compute()["ece"], expected)


def test_every_state_is_a_fixed_size_sum_and_nll_brier_accumulate_in_float64() -> None:
    metrics = UncertaintyMetrics(4, n_bins=10)
    sizes = {}
    for n in (10, 1000):
        probs, targets = _predictions(n=n)
        metrics.update(probs, targets, torch.rand(n))
        sizes[n] = {
            (name, state): tuple(getattr(metric, state).shape)
            for name, metric in metrics.named_children()
            for state in metric._defaults
        }
    assert sizes[10] == sizes[1000]  # nothing grows with the number of samples
    for metric in metrics.children():
        assert set(metric._reductions.values()) <= {torch.sum, dim_zero_sum}, type(metric).__name__
    probs, targets = _predictions(n=1000)
    assert metrics.nll.mean_value.dtype == metrics.brier.mean_value.dtype == torch.float64
    nll = UncertaintyMetrics(4)
    for p, t in zip(probs.split(7), targets.split(7), strict=True):
        nll.update(p, t)
    reference = negative_log_likelihood(probs, targets).double().mean()
    torch.testing.assert_close(nll.nll.mean_value / nll.nll.weight, reference, rtol=1e-12, atol=0)


def _ranked_metrics(rank: int, world_size: int) -> dict[str, float]:
    probs, targets = _predictions(n=300, k=4, seed=3)
    mi = torch.linspace(0, 1, 300)
    own = slice(0, 120) if rank == 0 else slice(120, 300)  # uneven shares, different numbers of batches
    metrics = UncertaintyMetrics(4, n_bins=10, mutual_information=True)
    for p, t, m in zip(probs[own].split(50), targets[own].split(50), mi[own].split(50), strict=True):
        metrics.update(p, t, m)
    values = {name: float(v) for name, v in metrics.compute().items()}
    values["bins"] = metrics.reliability().tolist()
    return values


def test_two_ddp_processes_give_the_metrics_of_one_process_on_the_union(process_group_pool) -> None:
    ranks = process_group_pool(_ranked_metrics)
    assert ranks[0] == ranks[1]
    probs, targets = _predictions(n=300, k=4, seed=3)
    single = UncertaintyMetrics(4, n_bins=10)
    single.update(probs, targets, torch.linspace(0, 1, 300))
    expected = {name: float(v) for name, v in single.compute().items()}
    assert {k: v for k, v in ranks[0].items() if k != "bins"} == pytest.approx(expected, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(torch.tensor(ranks[0]["bins"]), single.reliability())


def _mixed_predictions(n: int = 400, k: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets drawn from the predictions themselves: bins both over- and under-confident (on `_predictions`, every
    bin is over-confident and the ECE cannot tell one binning from another). Rows with confidences on the edges
    of 8 bins (exact in binary) and near-uniform rows (confidence ~0.1, in the first bin)."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.rand(n, 1, generator=g) * 4 * torch.randn(n, k, generator=g)).softmax(-1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)
    edges = torch.tensor([0.5, 0.625, 0.375, 1.0, 0.125])
    for row, top in enumerate(edges):
        probs[row] = (1 - top) / (k - 1)
        probs[row, row % k] = top
    return probs, targets


def test_reliability_bins_are_the_naive_per_sample_count_in_torchmetrics_bins() -> None:
    probs, targets = _mixed_predictions()
    n_bins = 8
    bins = reliability_bins(probs, targets, n_bins=n_bins)
    expected = torch.zeros(3, n_bins + 1)
    confidences, predictions = probs.max(dim=1)
    for c, p, y in zip(confidences.tolist(), predictions.tolist(), targets.tolist(), strict=True):
        b = min(int(c * n_bins), n_bins)  # [b/8, (b+1)/8), and a bin of its own for a confidence of exactly 1
        expected[:, b] += torch.tensor([1.0, c, float(p == y)])
    assert expected[0, 0] > 0
    assert expected[0, n_bins] == 1
    torch.testing.assert_close(bins, expected)
    gaps = expected[2, :n_bins] - expected[1, :n_bins]
    assert (gaps > 0).any()
    assert (gaps < 0).any()
    reference = multiclass_calibration_error(probs, targets, num_classes=10, n_bins=n_bins, norm="l1")
    torch.testing.assert_close(expected_calibration_error(bins), reference)


def test_ece_of_one_sample_and_of_no_sample() -> None:
    bins = reliability_bins(torch.tensor([[0.8, 0.2]]), torch.tensor([1]), n_bins=1)  # one bin is allowed
    assert bins.shape == (3, 2)
    torch.testing.assert_close(expected_calibration_error(bins), torch.tensor(0.8))  # |0 correct - 0.8| / 1
    assert expected_calibration_error(torch.zeros(3, 5)) == 0  # nothing binned yet (a rank without batches)


def test_every_function_checks_the_targets_against_the_probabilities() -> None:
    probs, targets = _predictions()
    message = (
        r"^Expected class-index targets of shape \(200,\) to match probabilities of shape \(200, 4\), but got shape "
        r"\(3,\)\. Pass `hard_targets\(targets\)` for soft targets\.$"
    )
    for function in (negative_log_likelihood, brier_score, reliability_bins):
        with pytest.raises(ValueError, match=message):
            function(probs, targets[:3])
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=f"Expected `n_bins` to be a positive int, but got {bad!r}"):
            reliability_bins(probs, targets, n_bins=bad)  # type: ignore[arg-type]


def test_reliability_bins_default_to_torchmetrics_15_bins() -> None:
    probs, targets = _mixed_predictions()
    bins = reliability_bins(probs, targets)
    assert bins.shape == (3, 16)  # 15 equal-width bins and the bin of confidence 1
    expected = multiclass_calibration_error(probs, targets, num_classes=10, n_bins=15, norm="l1")
    torch.testing.assert_close(expected_calibration_error(bins), expected)
