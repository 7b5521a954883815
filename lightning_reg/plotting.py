"""Reliability diagrams (Guo et al., 2017, https://arxiv.org/abs/1706.04599) as matplotlib PNGs.

Figures are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas directly: no pyplot, so no
global figure registry to leak, no backend switch and no rcParams change in the user's process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_reg.functional.uncertainty import expected_calibration_error, reliability_bins

__all__ = ["plot_reliability", "reliability_figure", "render_rgb"]


def reliability_figure(curves: Mapping[str, Tensor], title: str | None = None) -> object:
    """A reliability diagram of one or more predictions from their :func:`reliability_bins` sums.

    Each curve is drawn as bars of per-bin accuracy (the last, confidence-exactly-1 bin merged into the top
    bin); the diagonal is perfect calibration. The title gives each curve's ECE.

    Args:
        curves: label -> bins ``(3, n_bins + 1)``.
        title: a prefix for the title.

    Returns:
        A ``matplotlib.figure.Figure``.

    Example:
        >>> bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=5)
        >>> fig = reliability_figure({"model": bins})
        >>> fig.axes[0].get_title()
        'ECE 0.400 (model)'
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    parts = []
    for i, (label, bins) in enumerate(curves.items()):
        sums = bins.detach().double().cpu().clone()
        sums[:, -2] += sums[:, -1]  # confidence exactly 1 joins the top bin for display
        counts, _, correct = sums[:, :-1].numpy()
        n_bins = counts.shape[0]
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(counts > 0, correct / counts, 0.0)
        width = (edges[1] - edges[0]) / max(len(curves), 1)
        ax.bar(edges[:-1] + i * width, accuracy, width=width, align="edge", alpha=0.7, edgecolor="black", label=label)
        parts.append(f"ECE {float(expected_calibration_error(bins.double())):.3f} ({label})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(", ".join(parts) if title is None else f"{title}: " + ", ".join(parts), fontsize="small")
    fig.tight_layout()
    return fig


def render_rgb(fig: object) -> np.ndarray:
    """The figure's pixels ``(H, W, 3)`` as uint8, drawn on an Agg canvas (for TensorBoard's ``add_image``).

    Example:
        >>> from matplotlib.figure import Figure
        >>> render_rgb(Figure(figsize=(2, 1), dpi=50)).shape
        (50, 100, 3)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # type: ignore[arg-type]
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_reliability(probs: Tensor, targets: Tensor, path: str | Path, *, n_bins: int = 15) -> Tensor:
    """Write the reliability diagram of predicted probabilities to a PNG file, its ECE in the title.

    Args:
        probs: class probabilities ``(N, K)`` (for Monte-Carlo dropout, the mean probabilities).
        targets: class indices ``(N,)``.
        path: the PNG to write; missing parent folders are created.
        n_bins: equal-width confidence bins (torchmetrics' ``MulticlassCalibrationError`` binning).

    Returns:
        The expected calibration error shown in the title.

    Example:
        >>> import tempfile
        >>> probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ece = plot_reliability(probs, torch.tensor([0, 0, 0]), Path(tmp) / "reliability.png")
        ...     (Path(tmp) / "reliability.png").exists(), round(float(ece), 3)
        (True, 0.4)
    """
    bins = reliability_bins(torch.as_tensor(probs), torch.as_tensor(targets), n_bins)
    save_figure(reliability_figure({"predictions": bins}), path)
    return expected_calibration_error(bins)


def save_figure(fig: object, path: str | Path) -> Path:
    """Save a ``Figure`` as PNG through the Agg canvas; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))  # type: ignore[arg-type]
    return path
