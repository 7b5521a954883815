"""torchmetrics metrics for what uncertainty is for: catching mistakes, selective prediction, OOD detection.

- :class:`MisclassificationDetection`: AUROC and AUPR of the uncertainty score for telling wrong predictions
  (the positive class) from right ones, and the AURC of selective prediction;
- :class:`OODDetection`: AUROC (OOD as the positive class) and FPR at 95 % TPR (in-distribution kept) of in-
  versus out-of-distribution samples.

States are torchmetrics' concatenated lists (``dist_reduce_fx="cat"``): under DDP ``compute()`` gathers every
rank's samples, and every number is invariant to their order, so N ranks give what one process gives on the
union. AUROC and average precision are torchmetrics' own (``binary_auroc``, ``binary_average_precision``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.utilities import dim_zero_cat

from lightning_reg.functional.selective import aurc, fpr_at_tpr, risk_coverage

__all__ = ["MisclassificationDetection", "OODDetection", "plot_risk_coverage", "risk_coverage_figure"]


class _ScoresAndLabels(Metric):
    full_state_update = False
    is_differentiable = False
    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def _add(self, scores: Tensor, labels: Tensor) -> None:
        if scores.ndim != 1 or labels.shape != scores.shape:
            raise ValueError(
                f"Expected 1-D scores and labels of one length, but got shapes {tuple(scores.shape)} and "
                f"{tuple(labels.shape)}."
            )
        self.scores.append(scores.detach().double())
        self.labels.append(labels.detach().bool())

    def _gathered(self) -> tuple[Tensor, Tensor]:
        # a list per update; after a DDP sync torchmetrics holds the gathered tensor instead
        if isinstance(self.scores, list) and not self.scores:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        return dim_zero_cat(self.scores), dim_zero_cat(self.labels)


class MisclassificationDetection(_ScoresAndLabels):
    """Misclassification detection and selective prediction from an uncertainty score.

    ``compute()`` gives ``misclassification_auroc`` and ``misclassification_aupr`` (errors are the positive
    class, the uncertainty their score: 0.5 AUROC is chance) and ``aurc``, the area under the risk-coverage
    curve (Geifman et al., 2018; lower is better). With no error (or no correct prediction) the AUROC and AUPR
    are undefined and come out NaN; the AURC is still defined.

    Example:
        >>> metric = MisclassificationDetection()
        >>> metric.update(torch.tensor([0.1, 0.2, 0.9, 0.4]), torch.tensor([True, True, False, False]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'misclassification_auroc': 1.0, 'misclassification_aupr': 1.0, 'aurc': 0.2083}
    """

    def update(self, uncertainty: Tensor, correct: Tensor) -> None:
        """Add per-sample uncertainties ``(N,)`` and whether each top-1 prediction was right ``(N,)``."""
        self._add(uncertainty, ~correct.bool())

    def compute(self) -> dict[str, Tensor]:
        """AUROC, AUPR and AURC over every sample seen on every rank."""
        scores, errors = self._gathered()
        if scores.numel() == 0:
            nan = torch.tensor(float("nan"))
            return {"misclassification_auroc": nan, "misclassification_aupr": nan, "aurc": nan}
        both = bool(errors.any()) and not bool(errors.all())
        nan = torch.tensor(float("nan"), device=scores.device)
        return {
            "misclassification_auroc": binary_auroc(scores, errors.long()).float() if both else nan,
            "misclassification_aupr": binary_average_precision(scores, errors.long()).float() if both else nan,
            "aurc": aurc(scores, errors).float(),
        }

    def curve(self) -> tuple[Tensor, Tensor]:
        """The risk-coverage curve ``(coverage, risk)`` over every rank's samples (for plotting)."""
        scores, errors = self._gathered()
        return risk_coverage(scores, errors)


class OODDetection(_ScoresAndLabels):
    """Out-of-distribution detection from an uncertainty score: AUROC and FPR at 95 % TPR.

    ``ood_auroc``: OOD samples are the positive class and the uncertainty their score. ``ood_fpr95``: the share
    of OOD samples accepted as in-distribution at the threshold that keeps 95 % of the in-distribution samples
    (lower is better; Liang et al., 2018).

    Example:
        >>> metric = OODDetection()
        >>> metric.update(torch.tensor([0.1, 0.2, 0.3]), is_ood=torch.tensor([False, False, False]))
        >>> metric.update(torch.tensor([0.25, 0.9]), is_ood=torch.tensor([True, True]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'ood_auroc': 0.8333, 'ood_fpr95': 0.5}
    """

    def update(self, uncertainty: Tensor, is_ood: Tensor) -> None:
        """Add per-sample uncertainties ``(N,)`` and whether each sample is out of distribution ``(N,)``."""
        self._add(uncertainty, is_ood)

    def compute(self) -> dict[str, Tensor]:
        """AUROC and FPR at 95 % TPR over every rank's samples; NaN until both kinds were seen."""
        scores, ood = self._gathered()
        if scores.numel() == 0 or bool(ood.all()) or not bool(ood.any()):
            nan = torch.tensor(float("nan"))
            return {"ood_auroc": nan, "ood_fpr95": nan}
        return {
            "ood_auroc": binary_auroc(scores, ood.long()).float(),
            "ood_fpr95": fpr_at_tpr(-scores, ~ood, 0.95).float(),
        }


def risk_coverage_figure(curves: dict[str, tuple[Tensor, Tensor]], title: str | None = None) -> object:
    """A risk-coverage plot of one or more ``(coverage, risk)`` curves, with each curve's AURC in the legend.

    Example:
        >>> curve = risk_coverage(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([False, False, True]))
        >>> fig = risk_coverage_figure({"model": curve})
        >>> fig.axes[0].get_xlabel()
        'coverage'
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, (coverage, risk) in curves.items():
        c, r = coverage.detach().double().cpu().numpy(), risk.detach().double().cpu().numpy()
        ax.plot(c, r, label=f"{label} (AURC {float(risk.double().mean()):.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate of the accepted samples)")
    ax.legend(loc="upper left", fontsize="small")
    if title is not None:
        ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig


def plot_risk_coverage(uncertainty: Tensor, correct: Tensor, path: str | Path) -> Tensor:
    """Write the risk-coverage plot of per-sample uncertainties and correctness to a PNG; returns the AURC.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     value = plot_risk_coverage(torch.tensor([0.1, 0.9]), torch.tensor([True, False]), Path(tmp) / "rc.png")
        ...     (Path(tmp) / "rc.png").exists(), round(float(value), 3)
        (True, 0.25)
    """
    from lightning_reg.plotting import save_figure

    curve = risk_coverage(torch.as_tensor(uncertainty), ~torch.as_tensor(correct).bool())
    save_figure(risk_coverage_figure({"predictions": curve}), path)
    return curve[1].mean()
