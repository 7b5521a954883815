"""MixUp or CutMix, one draw per batch (or per sample): the timm / DeiT recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey
from lightning_reg.callbacks._mixing import MixMode, TargetMode
from lightning_reg.callbacks.cutmix import Carry, CutMix
from lightning_reg.functional._apply import blend, to_device
from lightning_reg.functional._checks import check_alpha, check_probability, resolve_dims
from lightning_reg.functional.cutmix import Box, Layout
from lightning_reg.functional.mixup import MixingParams, Pairing, sample_mixup

__all__ = ["MixUpCutMix"]


class MixUpCutMix(CutMix):
    """MixUp or CutMix for each training batch (or sample), drawn with probability ``switch_prob`` for CutMix.

    Args:
        mixup_alpha: MixUp's Beta concentration.
        cutmix_alpha: CutMix's Beta concentration.
        switch_prob: probability of CutMix for a batch (a sample with ``mode="elem"``).
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches (samples with ``mode="elem"``) that are mixed at all.
        per_sample: per-sample lambdas (and boxes) with ``mode="batch"``.
        label_smoothing: smoothing folded into the one-hot targets (or use ``LabelSmoothing``).
        input_key: where the inputs are in the batch.
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing.
        dims: CutMix's axes or layout (see :class:`CutMix`).
        inplace: overwrite the batch's input tensor (see :class:`MixUp`).
        pairing: ``"shift"`` or ``"permutation"`` (see :class:`MixUp`).
        multi_label: multi-hot targets (see :class:`MixUp`).
        mode: ``"batch"``, ``"elem"`` or ``"pair"`` (timm's ``mode``; see :class:`MixUp`).
        target_mode: ``"mixed"`` or ``"dominant"`` (see :class:`MixUp`).
        cutmix_minmax: timm's ``cutmix_minmax`` (see :class:`CutMix`).
        correct_lam: see :class:`CutMix`.
        carry: entries cut with the inputs (see :class:`CutMix`).

    Example:
        >>> import lightning as L
        >>> cb = MixUpCutMix(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, num_classes=10)
        >>> trainer = L.Trainer(callbacks=[cb], logger=False)

    Notes:
        The timm / DeiT recipe; with ``mode="elem"`` or ``"pair"`` the choice, lambda and whether to mix are drawn
        per sample (pair), as timm's ``Mixup(mode=...)``. Logs ``mixup_cutmix/mixed_fraction``,
        ``mixup_cutmix/lambda`` and ``mixup_cutmix/cutmix_fraction`` per epoch. See docs/mixing.md.
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
        dims: Sequence[int] | Layout | None = None,
        inplace: bool = False,
        pairing: Pairing = "shift",
        multi_label: bool = False,
        mode: MixMode = "batch",
        target_mode: TargetMode = "mixed",
        cutmix_minmax: tuple[float, float] | None = None,
        correct_lam: bool = True,
        carry: Sequence[BatchKey] | Mapping[BatchKey, Carry] | None = None,
    ) -> None:
        cutmix_alpha = check_alpha(cutmix_alpha, "cutmix_alpha")  # before CutMix's check, which says `alpha`
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
            multi_label=multi_label,
            mode=mode,
            target_mode=target_mode,
            cutmix_minmax=cutmix_minmax,
            correct_lam=correct_lam,
            carry=carry,
        )
        self.mixup_alpha = check_alpha(mixup_alpha, "mixup_alpha")
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = check_probability(switch_prob, "switch_prob")

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        prepared = self._prepare(trainer, pl_module, batch)
        if prepared is None:
            return
        inputs, targets = prepared
        self._check_blendable(inputs)
        resolve_dims(inputs, self.dims)  # the layout is checked on every batch, not only on the CutMix ones
        if self.mode != "batch":
            self._mix_elem(trainer, pl_module, batch, inputs, targets)
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
        params = MixingParams(self._round_lam(params.lam, self._lam_dtype(trainer, inputs)), params.index, params.shift)
        on_device = self._to_device(params, inputs.device)
        # Targets first, inputs last (see MixUp).
        mixed_targets = self._mixed_targets(pl_module, targets, on_device.lam, on_device.index, on_device.shift)
        self._write(batch, self.target_key, mixed_targets, "target_key")
        inplace = self.inplace and not inputs.requires_grad
        out = inputs if inplace else self._mix_out(inputs)
        mixed = blend(inputs, on_device.lam, on_device.index, on_device.shift, out=out)
        self._write(batch, self.input_key, mixed, "input_key")
        self._record(params.lam)

    def _mix_elem(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, inputs: Tensor, targets: Any
    ) -> None:
        """Draw as timm's ``mode="elem"``/``"pair"``: MixUp or CutMix (or nothing) chosen per sample, in one pass."""
        axes = resolve_dims(inputs, self.dims)
        weight, box, kept, index, shift = self._elem_draws(
            inputs.shape[0],
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            switch_prob=self.switch_prob,
            sizes=[inputs.shape[d] for d in axes],
            minmax=self.cutmix_minmax,
            correct_lam=self.correct_lam,
            lam_dtype=self._lam_dtype(trainer, inputs),
        )
        assert box is not None
        companions = self._companions(batch, inputs, axes)
        device = inputs.device
        on_device = self._to_device(MixingParams(kept, index, shift), device)
        box_d = Box(to_device(box.lo, device), to_device(box.hi, device))
        mixed_targets = self._mixed_targets(pl_module, targets, on_device.lam, on_device.index, on_device.shift)
        self._write(batch, self.target_key, mixed_targets, "target_key")
        for key, entry in companions.items():
            self._write(batch, key, self._paste(entry, on_device, box_d, axes), "carry")
        weight_d = to_device(weight, device)
        if torch.is_floating_point(inputs):
            weight_d = weight_d.to(inputs.dtype)
        mixed = self._mix_elem_inputs(inputs, weight_d, box_d, on_device.index, on_device.shift, axes)
        self._write(batch, self.input_key, mixed, "input_key")
        self._record(kept, cutmix=float((box.hi > box.lo).all(1).float().mean()))  # the share of samples cut

    def _epoch_metrics(self) -> dict[str, float]:
        metrics = super()._epoch_metrics()
        metrics[f"{self.log_name}/cutmix_fraction"] = self._stats["cutmix"] / self._stats["batches"]
        return metrics
