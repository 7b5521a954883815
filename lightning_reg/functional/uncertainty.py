"""Uncertainty and calibration formulas for class probabilities: entropy, NLL, Brier score, reliability bins.

Pure tensor functions shared by :func:`lightning_reg.functional.mc_dropout_predict` and the torchmetrics
metrics of :mod:`lightning_reg.metrics`, so that each formula exists once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["brier_score", "entropy", "expected_calibration_error", "negative_log_likelihood", "reliability_bins"]

# Probabilities are clamped here before the log in the NLL, so that a confidently wrong prediction costs
# -log(1e-12) ~ 27.6 nats instead of inf (the convention of torch's ``F.nll_loss`` on clamped log-probs).
_EPS = 1e-12


def _check_probs(probs: Tensor, targets: Tensor | None = None) -> None:
    if probs.ndim != 2:
        raise ValueError(f"Expected probabilities of shape (N, K), but got shape {tuple(probs.shape)}.")
    if targets is not None and (targets.ndim != 1 or targets.shape[0] != probs.shape[0]):
        raise ValueError(
            f"Expected class-index targets of shape ({probs.shape[0]},) to match probabilities of shape "
            f"{tuple(probs.shape)}, but got shape {tuple(targets.shape)}. "
            "Pass `hard_targets(targets)` for soft targets."
        )


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dimension, with ``0 log 0 = 0``.

    Args:
        probs: probabilities ``(..., K)`` whose last dimension sums to 1.

    Returns:
        Entropies of shape ``probs.shape[:-1]``.

    Example:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    return torch.special.entr(probs).sum(dim=-1)  # entr(p) = -p log p, 0 at p = 0


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample negative log-likelihood ``-log p[y]`` of class probabilities (clamped at 1e-12).

    Args:
        probs: probabilities ``(N, K)``.
        targets: class indices ``(N,)``.

    Returns:
        ``(N,)`` losses in nats.

    Example:
        >>> negative_log_likelihood(torch.tensor([[0.25, 0.75]]), torch.tensor([1]))
        tensor([0.2877])
    """
    _check_probs(probs, targets)
    return -probs.gather(1, targets.long().unsqueeze(1)).squeeze(1).clamp_min(_EPS).log()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample multi-class Brier score ``sum_k (p_k - [y = k])^2`` (Brier, 1950), in [0, 2].

    Args:
        probs: probabilities ``(N, K)``.
        targets: class indices ``(N,)``.

    Returns:
        ``(N,)`` scores.

    Example:
        >>> brier_score(torch.tensor([[0.25, 0.75]]), torch.tensor([1]))
        tensor([0.1250])
    """
    _check_probs(probs, targets)
    one_hot = torch.zeros_like(probs).scatter_(1, targets.long().unsqueeze(1), 1.0)
    return (probs - one_hot).pow(2).sum(dim=1)


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Per-bin sums for a reliability diagram and the expected calibration error: ``(3, n_bins + 1)``.

    Rows are the number of samples, the sum of top-1 confidences and the number of correct top-1
    predictions in each confidence bin. The bins are torchmetrics' (``MulticlassCalibrationError``):
    ``n_bins`` equal-width bins on [0, 1) and one more holding confidences of exactly 1, so that the ECE
    from these sums (:func:`expected_calibration_error`) equals torchmetrics' ``norm="l1"`` value. Sums
    rather than means, so that bins from several batches or DDP ranks add up.

    Args:
        probs: probabilities ``(N, K)``.
        targets: class indices ``(N,)``.
        n_bins: number of equal-width confidence bins.

    Example:
        >>> bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=2)
        >>> bins
        tensor([[0.0000, 2.0000, 0.0000],
                [0.0000, 1.6000, 0.0000],
                [0.0000, 1.0000, 0.0000]])
    """
    _check_probs(probs, targets)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive int, but got {n_bins!r}.")
    confidences, predictions = probs.float().max(dim=1)
    correct = (predictions == targets).float()
    boundaries = torch.linspace(0, 1, n_bins + 1, device=probs.device)
    index = (torch.bucketize(confidences, boundaries, right=True) - 1).clamp_(0, n_bins)
    bins = torch.zeros(3, n_bins + 1, device=probs.device)
    bins[0].scatter_add_(0, index, torch.ones_like(confidences))
    bins[1].scatter_add_(0, index, confidences)
    bins[2].scatter_add_(0, index, correct)
    return bins


def expected_calibration_error(bins: Tensor) -> Tensor:
    """ECE (Naeini et al., 2015; Guo et al., 2017) from :func:`reliability_bins` sums.

    ``sum_b (n_b / n) |acc_b - conf_b|``: the gap between accuracy and confidence, weighted by bin size.

    Example:
        >>> bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=2)
        >>> expected_calibration_error(bins)
        tensor(0.3000)
    """
    counts, confidence_sums, correct_sums = bins
    total = counts.sum().clamp_min(1.0)
    return (correct_sums - confidence_sums).abs().sum() / total
