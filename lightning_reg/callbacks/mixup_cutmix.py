"""MixUp or CutMix, one draw per batch: the timm / DeiT recipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_reg._batch import BatchKey
from lightning_reg.callbacks.cutmix import CutMix
from lightning_reg.functional.mixup import Pairing, _check_alpha, apply_mixup, sample_mixup

__all__ = ["MixUpCutMix"]


class MixUpCutMix(CutMix):
    """Switch between MixUp and CutMix: each training batch is mixed by one of them, drawn per batch.

    With probability ``switch_prob`` a batch gets CutMix (``Beta(cutmix_alpha, cutmix_alpha)``), otherwise
    MixUp (``Beta(mixup_alpha, mixup_alpha)``). The draws come from the callback's own generator, so the
    choice is reproducible, resumable and differs across DDP ranks.

    Args:
        mixup_alpha: MixUp's Beta concentration.
        cutmix_alpha: CutMix's Beta concentration.
        switch_prob: probability of CutMix for a batch.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches that are mixed at all.
        per_sample: per-sample lambdas (and boxes).
        label_smoothing: smoothing folded into the one-hot targets (or use ``LabelSmoothing``).
        input_key: where the inputs are in the batch.
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing.
        dims: CutMix's axes (see :class:`CutMix`).
        inplace: overwrite the batch's input tensor (see :class:`MixUp`).
        pairing: ``"shift"`` or ``"permutation"`` (see :class:`MixUp`).

    Logs ``mixup_cutmix/mixed_fraction``, ``mixup_cutmix/lambda`` and ``mixup_cutmix/cutmix_fraction`` (the
    fraction of training batches mixed by CutMix) once per training epoch.

    Example:
        >>> import lightning as L
        >>> cb = MixUpCutMix(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, num_classes=10)
        >>> trainer = L.Trainer(callbacks=[cb], logger=False)
    """

    log_name = "mixup_cutmix"

    def __init__(
        self,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        *,
        num_classes: int | None = None,
        prob: float = 1.0,
        per_sample: bool = False,
        label_smoothing: float = 0.0,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        last_epoch: int | None = None,
        dims: Sequence[int] | None = None,
        inplace: bool = False,
        pairing: Pairing = "shift",
    ) -> None:
        cutmix_alpha = _check_alpha(cutmix_alpha, "cutmix_alpha")  # before CutMix's check, which says `alpha`
        super().__init__(
            cutmix_alpha,
            num_classes=num_classes,
            prob=prob,
            per_sample=per_sample,
            label_smoothing=label_smoothing,
            input_key=input_key,
            target_key=target_key,
            last_epoch=last_epoch,
            dims=dims,
            inplace=inplace,
            pairing=pairing,
        )
        self.mixup_alpha = _check_alpha(mixup_alpha, "mixup_alpha")
        self.cutmix_alpha = cutmix_alpha
        if isinstance(switch_prob, bool) or not isinstance(switch_prob, int | float) or not 0 <= switch_prob <= 1:
            raise ValueError(f"Expected `switch_prob` to be a float in [0, 1], but got {switch_prob!r}.")
        self.switch_prob = float(switch_prob)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"mixup_alpha": self.mixup_alpha, "switch_prob": self.switch_prob, **super()._state_key_fields()}

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active(trainer):
            self._record()
            return
        prepared = self._prepare(pl_module, batch)
        if prepared is None:
            return
        inputs, targets = prepared
        if not self._draw_apply():
            self._write(batch, self.target_key, self._unmixed_targets(pl_module, targets), "target_key")
            self._record()
            return
        if bool(torch.rand((), generator=self.generator) < self.switch_prob):
            self._cut(pl_module, batch, inputs, targets, self.cutmix_alpha, self.dims)
            return
        params = sample_mixup(
            inputs.shape[0],
            self.mixup_alpha,
            per_sample=self.per_sample,
            pairing=self.pairing,
            generator=self.generator,
        )
        # Targets first, inputs last (see MixUp).
        self._write(
            batch, self.target_key, self._mixed_targets(pl_module, targets, params.lam, params.index), "target_key"
        )
        inplace = self.inplace and not inputs.requires_grad
        out = None if inplace else self._mix_out(inputs)
        self._write(batch, self.input_key, apply_mixup(inputs, params, inplace=inplace, out=out), "input_key")
        self._record(params.lam)

    def _epoch_metrics(self) -> dict[str, float]:
        metrics = super()._epoch_metrics()
        metrics[f"{self.log_name}/cutmix_fraction"] = self._stats["cutmix"] / self._stats["batches"]
        return metrics
