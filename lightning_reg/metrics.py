"""torchmetrics metrics for predictive uncertainty: NLL, Brier score, reliability bins, and their bundle.

Every state is a sum (``dist_reduce_fx="sum"``) of fixed size, so that under DDP ``compute()`` gives what one
process would give on the union of all ranks' data, whatever the number of samples. The formulas live once, in
:mod:`lightning_reg.functional.uncertainty`; the ECE is computed from the reliability bins' sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_reg.functional.uncertainty import (
    brier_score,
    entropy,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

__all__ = ["BrierScore", "NegativeLogLikelihood", "ReliabilityBins", "UncertaintyMetrics"]


class _PerSampleMean(MeanMetric):
    """Mean of a per-sample quantity: torchmetrics' ``MeanMetric`` (sum states), accumulated in float64."""

    is_differentiable = False  # type: ignore[assignment]  # MeanMetric leaves both None
    higher_is_better = False  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)  # a NaN prediction shows in the mean, as in the formula
        self.set_dtype(torch.float64)

    def _values(self, probs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        """Add a batch of probabilities ``(N, K)`` and class-index targets ``(N,)``."""
        super().update(self._values(probs, targets))

    def compute(self) -> Tensor:
        """The mean over every sample seen (on every rank), as float32."""
        return super().compute().float()


class NegativeLogLikelihood(_PerSampleMean):
    """Mean negative log-likelihood of the targets under predicted probabilities (nats).

    Example:
        >>> metric = NegativeLogLikelihood()
        >>> metric.update(torch.tensor([[0.25, 0.75], [0.5, 0.5]]), torch.tensor([1, 0]))
        >>> metric.compute()
        tensor(0.4904)
    """

    def _values(self, probs: Tensor, targets: Tensor) -> Tensor:
        return negative_log_likelihood(probs, targets)


class BrierScore(_PerSampleMean):
    """Mean multi-class Brier score ``sum_k (p_k - [y = k])^2`` (Brier, 1950).

    Example:
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([[0.25, 0.75], [0.5, 0.5]]), torch.tensor([1, 0]))
        >>> metric.compute()
        tensor(0.3125)
    """

    def _values(self, probs: Tensor, targets: Tensor) -> Tensor:
        return brier_score(probs, targets)


class ReliabilityBins(Metric):
    """Per-bin counts, confidence sums and correct counts for a reliability diagram, summed across ranks.

    ``compute()`` gives the ``(3, n_bins + 1)`` sums of :func:`~lightning_reg.functional.uncertainty.reliability_bins`.

    Example:
        >>> metric = ReliabilityBins(n_bins=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]))
        >>> metric.compute()[0]
        tensor([0., 2., 0.])
    """

    full_state_update = False
    is_differentiable = False
    bins: Tensor

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"Expected `n_bins` to be a positive int, but got {n_bins!r}.")
        self.n_bins = n_bins
        self.add_state("bins", default=torch.zeros(3, n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch of probabilities ``(N, K)`` and class-index targets ``(N,)``."""
        self.bins += reliability_bins(probs, targets, self.n_bins).to(torch.float64)

    def compute(self) -> Tensor:
        """The summed bins ``(3, n_bins + 1)``."""
        return self.bins.float()


class UncertaintyMetrics(nn.Module):
    """The uncertainty report of one kind of prediction: accuracy, NLL, Brier, ECE, entropy, mutual information.

    Accuracy is micro-averaged (the fraction of correct top-1 predictions); the ECE (l1, ``n_bins`` equal-width
    bins) comes from the reliability bins' sums and equals torchmetrics' ``multiclass_calibration_error``; entropy
    and mutual information are means over samples (mutual information only when given: a deterministic prediction
    has none). Every state is a fixed-size sum, reduced over DDP ranks.

    Args:
        num_classes: number of classes.
        n_bins: confidence bins of the ECE and the reliability diagram.
        mutual_information: whether ``compute()`` reports the mutual information. ``None``: once an update gave
            it. Under DDP pass it explicitly, so that a rank that saw no batch computes (and syncs) the same
            metrics as the others.

    Example:
        >>> metrics = UncertaintyMetrics(num_classes=2)
        >>> metrics.update(torch.tensor([[0.25, 0.75], [0.5, 0.5]]), torch.tensor([1, 0]))
        >>> {k: round(float(v), 4) for k, v in metrics.compute().items()}
        {'acc': 1.0, 'nll': 0.4904, 'brier': 0.3125, 'ece': 0.375, 'entropy': 0.6277}
    """

    def __init__(self, num_classes: int, n_bins: int = 15, *, mutual_information: bool | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._fixed_mutual_info = mutual_information
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.nll = NegativeLogLikelihood()
        self.brier = BrierScore()
        self.entropy = MeanMetric()
        self.mutual_info = MeanMetric()
        self.bins = ReliabilityBins(n_bins)
        self._has_mutual_info = bool(mutual_information)

    def update(self, probs: Tensor, targets: Tensor, mutual_information: Tensor | None = None) -> None:
        """Add probabilities ``(N, K)``, class-index targets ``(N,)`` and, for MC predictions, ``(N,)`` MI."""
        probs = probs.float()
        self.acc.update(probs, targets)
        self.nll.update(probs, targets)
        self.brier.update(probs, targets)
        self.entropy.update(entropy(probs))
        self.bins.update(probs, targets)
        if mutual_information is not None:
            if self._fixed_mutual_info is False:
                raise ValueError("Got `mutual_information` for metrics built with `mutual_information=False`.")
            self.mutual_info.update(mutual_information.float())
            self._has_mutual_info = True

    def compute(self) -> dict[str, Tensor]:
        """The metrics over every sample seen on every rank, by name."""
        values = {
            "acc": self.acc.compute(),
            "nll": self.nll.compute(),
            "brier": self.brier.compute(),
            "ece": expected_calibration_error(self.bins.compute()),
            "entropy": self.entropy.compute(),
        }
        if self._has_mutual_info:
            values["mutual_info"] = self.mutual_info.compute()
        return values

    def reliability(self) -> Tensor:
        """The reliability-diagram bins ``(3, n_bins + 1)`` over every rank's samples."""
        return self.bins.compute()

    def reset(self) -> None:
        """Forget every sample seen."""
        for metric in (self.acc, self.nll, self.brier, self.entropy, self.mutual_info, self.bins):
            metric.reset()
        self._has_mutual_info = bool(self._fixed_mutual_info)
