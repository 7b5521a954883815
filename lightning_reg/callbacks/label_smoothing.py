"""The LabelSmoothing callback (Szegedy et al., 2016, https://arxiv.org/abs/1512.00567)."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry
from lightning_reg.callbacks._mixing import MixingCallback
from lightning_reg.functional._checks import check_smoothing
from lightning_reg.functional.label_smoothing import one_hot
from lightning_reg.mixins import MixedTargets

__all__ = ["LabelSmoothing"]


class LabelSmoothing(MixingCallback):
    """Label smoothing of training targets: ``(1 - smoothing) * p + smoothing / K`` as ``(N, K)`` probabilities.

    Args:
        smoothing: mass spread uniformly over the classes, in ``[0, 1)``.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        target_key: where the targets are in the batch (list position or dict key).
        multi_label: the targets are multi-hot rows ``(N, K)``: every entry is smoothed as a binary label,
            ``(1 - s) * y + s / 2`` (timm's ``multi_label``). Without it, float rows must be distributions.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LabelSmoothing(0.1, num_classes=10)], logger=False)

    Notes:
        Training batches only. Smoothing commutes with mixing, so labels are smoothed exactly once with a mixing
        callback before or after this one; a second source of smoothing is an error at fit start. See
        docs/label_smoothing.md.
    """

    mixes_inputs = False

    def __init__(
        self,
        smoothing: float = 0.1,
        *,
        num_classes: int | None = None,
        target_key: BatchKey = 1,
        multi_label: bool = False,
    ) -> None:
        check_smoothing(smoothing)
        super().__init__(
            num_classes=num_classes,
            prob=1.0,
            label_smoothing=0.0,
            input_key=0,
            target_key=target_key,
            last_epoch=None,
            multi_label=multi_label,
        )
        self.smoothing = float(smoothing)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"target_key": self.target_key}

    def _smoothing_source(self) -> str | None:
        return f"LabelSmoothing({self.smoothing})" if self.smoothing > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """Nothing: label smoothing draws no random numbers."""
        return {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage, needs_classes=True)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        raw = get_entry(batch, self.target_key, "target_key")
        if isinstance(raw, MixedTargets):
            self._write(batch, self.target_key, raw._replace(smoothing=self.smoothing), "target_key")
            return
        targets = self._read_targets(batch)
        assert self._num_classes is not None  # set in setup
        if getattr(pl_module, "sparse_mixed_targets", False) and targets.ndim == 1:
            smoothed: Any = MixedTargets.unmixed(targets, self._num_classes, self.smoothing)
        else:
            smoothed = one_hot(targets, self._num_classes, self.smoothing, multi_label=self.multi_label, validate=False)
        self._write(batch, self.target_key, smoothed, "target_key")
