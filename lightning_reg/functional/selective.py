"""Selective prediction and detection from an uncertainty score: risk-coverage, AURC, FPR at 95 % TPR.

Pure tensor functions behind :mod:`lightning_reg.selective_metrics`. Every function is invariant to the order
of the samples (ties in the score are resolved by their expectation, not by position), so that the numbers
of several DDP ranks gathered in any order equal those of one process.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_reg.functional.uncertainty import entropy

__all__ = ["UncertaintyScore", "aurc", "fpr_at_tpr", "risk_coverage", "uncertainty_score"]

UncertaintyScore = Literal["entropy", "mutual_information", "max_prob"]
_SCORES: tuple[str, ...] = get_args(UncertaintyScore)


def uncertainty_score(
    probs: Tensor, score: UncertaintyScore = "entropy", mutual_information: Tensor | None = None
) -> Tensor:
    """The per-sample uncertainty ``(N,)`` (higher = less certain) of predicted probabilities ``(N, K)``.

    Args:
        probs: probabilities (for Monte-Carlo dropout, the mean over samples).
        score: ``"entropy"`` (predictive entropy), ``"mutual_information"`` (needs ``mutual_information``) or
            ``"max_prob"`` (``1 - max_k p_k``).
        mutual_information: the ``(N,)`` mutual information, for ``score="mutual_information"``.

    Example:
        >>> uncertainty_score(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), "max_prob")
        tensor([0.1000, 0.5000])
    """
    if score not in _SCORES:
        raise ValueError(f"Expected `score` to be one of {_SCORES}, but got {score!r}.")
    if score == "entropy":
        return entropy(probs)
    if score == "max_prob":
        return 1.0 - probs.max(dim=-1).values
    if mutual_information is None:
        raise ValueError(
            "`score='mutual_information'` needs the mutual information of Monte-Carlo samples; a deterministic "
            "prediction has none. Use `score='entropy'` or `'max_prob'`."
        )
    return mutual_information


def _check(scores: Tensor, labels: Tensor, name: str) -> None:
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"Expected 1-D `scores` and `{name}` of the same length, but got shapes {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if scores.numel() == 0:
        raise ValueError("Expected at least one sample, but got none.")


def risk_coverage(uncertainty: Tensor, errors: Tensor) -> tuple[Tensor, Tensor]:
    """The risk-coverage curve of selective prediction (Geifman & El-Yaniv, 2017; Geifman et al., 2018).

    Accept the ``k`` least uncertain samples (coverage ``k / N``); the risk is the error rate among them.
    Samples with equal uncertainty are accepted in random order: the risk inside a tie is its expectation,
    which depends on the set of samples only, never on their order.

    Args:
        uncertainty: per-sample uncertainty ``(N,)`` (higher = rejected first).
        errors: per-sample 0/1 loss ``(N,)`` (True where the prediction is wrong).

    Returns:
        ``(coverage, risk)``, each ``(N,)`` float64, coverage ``1/N, 2/N, ..., 1``.

    Example:
        >>> coverage, risk = risk_coverage(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([False, False, True]))
        >>> risk
        tensor([0.0000, 0.0000, 0.3333], dtype=torch.float64)
    """
    _check(uncertainty, errors, "errors")
    order = torch.argsort(uncertainty.double(), stable=True)
    u = uncertainty.double()[order]
    e = errors.double()[order]
    n = u.numel()
    _, counts = torch.unique_consecutive(u, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts), device=u.device), counts)  # (N,) group of each rank
    ends = counts.cumsum(0)  # position after each group
    starts = ends - counts
    group_errors = torch.zeros(len(counts), dtype=torch.float64, device=u.device).index_add_(0, group, e)
    before = group_errors.cumsum(0) - group_errors  # errors of the groups before each group
    k = torch.arange(1, n + 1, dtype=torch.float64, device=u.device)
    # expected errors among the first k: whole earlier groups, plus a uniform share of the current group's
    expected = before[group] + (k - starts[group].double()) * group_errors[group] / counts[group].double()
    return k / n, expected / k


def aurc(uncertainty: Tensor, errors: Tensor) -> Tensor:
    """Area under the risk-coverage curve (Geifman et al., 2018): the mean risk over coverages ``1/N .. 1``.

    Lower is better; a perfect ranking gives the error rate's own minimum, a random one the error rate.

    Example:
        >>> aurc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([False, False, True]))
        tensor(0.1111, dtype=torch.float64)
    """
    _, risk = risk_coverage(uncertainty, errors)
    return risk.mean()


def fpr_at_tpr(confidence: Tensor, positive: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr`` (FPR at 95 % TPR).

    Samples with ``confidence >= threshold`` are called positive. The threshold is the highest one that keeps
    at least ``tpr`` of the positives; the FPR is the share of negatives at or above it. For OOD detection the
    in-distribution samples are the positives and the confidence is ``-uncertainty`` (Liang et al., 2018).

    Args:
        confidence: ``(N,)`` scores, higher = more likely positive.
        positive: ``(N,)`` booleans.
        tpr: the true-positive rate to reach, in (0, 1].

    Example:
        >>> fpr_at_tpr(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]), tpr=0.5)
        tensor(0., dtype=torch.float64)
    """
    _check(confidence, positive, "positive")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"Expected `tpr` in (0, 1], but got {tpr!r}.")
    positive = positive.bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"Expected both positive and negative samples, but got {n_pos} positive and {n_neg} negative ones."
        )
    c = confidence.double()
    thresholds = torch.unique(c, sorted=True).flip(0)  # descending, each tie once
    # positives/negatives at or above each threshold
    pos_scores, neg_scores = c[positive].sort().values, c[~positive].sort().values
    tp = n_pos - torch.searchsorted(pos_scores, thresholds, side="left")
    fp = n_neg - torch.searchsorted(neg_scores, thresholds, side="left")
    first = int(torch.nonzero(tp.double() / n_pos >= tpr - 1e-12)[0, 0])
    return fp[first].double() / n_neg
