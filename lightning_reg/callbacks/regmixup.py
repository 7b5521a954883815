"""The RegMixup callback (Pinto et al., NeurIPS 2022, https://arxiv.org/abs/2206.14502): clean batch + mixed copy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, set_entry
from lightning_reg.callbacks._mixing import MixingCallback
from lightning_reg.functional._apply import blend
from lightning_reg.functional._checks import check_alpha
from lightning_reg.functional.mixup import MixingParams, Pairing, sample_mixup
from lightning_reg.mixins import MixedTargets

__all__ = ["RegMixup"]


class RegMixup(MixingCallback):
    """RegMixup: train on the clean batch and its MixUp copy together, ``2N`` rows, clean first.

    Args:
        alpha: concentration of ``Beta(alpha, alpha)``; the paper's default is 20 (10 to 30 work well).
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches that get their mixed copy.
        per_sample: one lambda per sample instead of one per batch.
        label_smoothing: smoothing folded into both halves' targets (or use the ``LabelSmoothing`` callback).
        input_key: where the inputs are in the batch (list position or dict key).
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing and targets are left as they come.
        pairing: ``"shift"`` or ``"permutation"``, as for :class:`~lightning_reg.MixUp`.
        multi_label: the targets are multi-hot rows ``(N, K)``.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[RegMixup(alpha=20.0, num_classes=10)], logger=False)

    Notes:
        ``F.cross_entropy`` on the doubled batch is ``(CE(clean) + CE(mixed)) / 2``, the RegMixup objective with
        ``eta = 1`` up to the factor 1/2. Other tensors of ``N`` rows (lengths, masks) are repeated; a batch that
        is not mixed keeps its ``N`` rows. Twice the memory and about twice the step time. Logs
        ``regmixup/mixed_fraction`` and ``regmixup/lambda`` per epoch. See docs/calibration.md.
    """

    log_name = "regmixup"

    def __init__(
        self,
        alpha: float = 20.0,
        *,
        num_classes: int | None = None,
        prob: float = 1.0,
        per_sample: bool = False,
        label_smoothing: float = 0.0,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        last_epoch: int | None = None,
        pairing: Pairing = "shift",
        multi_label: bool = False,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            prob=prob,
            label_smoothing=label_smoothing,
            input_key=input_key,
            target_key=target_key,
            last_epoch=last_epoch,
            pairing=pairing,
            multi_label=multi_label,
        )
        self.alpha = check_alpha(alpha)
        self.per_sample = bool(per_sample)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "sparse_mixed_targets", False):
            raise ValueError(
                f"RegMixup doubles the batch into clean and mixed rows, which sparse targets cannot hold: "
                f"{type(pl_module).__name__} uses SparseMixingMixin. Drop the mixin (dense (N, K) targets) to use "
                "RegMixup."
            )
        self._setup(trainer, pl_module, stage, needs_classes=True)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        begun = self._begin(trainer, pl_module, batch)
        if begun is None:
            return
        inputs, targets = begun
        assert inputs is not None  # read by `_begin`
        if isinstance(targets, MixedTargets):
            raise ValueError(
                "RegMixup received sparse mixed targets (MixedTargets) from another callback: it needs dense "
                "targets. Use RegMixup as the only mixing callback."
            )
        self._check_blendable(inputs)
        n = targets.shape[0]
        params = sample_mixup(n, self.alpha, per_sample=self.per_sample, pairing=self.pairing, generator=self.generator)
        params = MixingParams(self._round_lam(params.lam, self._lam_dtype(trainer, inputs)), params.index, params.shift)
        on_device = self._to_device(params, inputs.device)
        clean_targets = self._unmixed_targets(pl_module, targets)
        mixed_targets = self._mixed_targets(pl_module, targets, on_device.lam, on_device.index, on_device.shift)
        assert isinstance(clean_targets, Tensor)
        assert isinstance(mixed_targets, Tensor)
        both_targets = torch.cat([clean_targets.to(mixed_targets.dtype), mixed_targets])  # (2N, K)
        both_inputs = self._both_inputs(inputs, on_device)  # (2N, ...)
        self._repeat_companions(batch, n)
        self._write(batch, self.target_key, both_targets, "target_key")
        self._write(batch, self.input_key, both_inputs, "input_key")
        self._record(params.lam)

    def _both_inputs(self, inputs: Tensor, params: MixingParams) -> Tensor:
        """``cat([inputs, mixup(inputs)])`` written once into a (reused) ``(2N, ...)`` tensor."""
        n = inputs.shape[0]
        if inputs.requires_grad:
            return torch.cat([inputs, blend(inputs, params.lam, params.index, params.shift)])
        out = self._output.take_empty((2 * n, *inputs.shape[1:]), inputs.dtype, inputs.device)
        out[:n].copy_(inputs)
        blend(inputs, params.lam, params.index, params.shift, out=out[n:])
        return out

    def _repeat_companions(self, batch: Any, n: int) -> None:
        """Repeat every other tensor of ``N`` rows (lengths, masks): row ``N + i`` is the mix of sample ``i``."""
        if isinstance(batch, Mapping):
            keys: list[Any] = list(batch)
            skip = {self.input_key, self.target_key}
        else:
            keys = list(range(len(batch)))
            skip = {k % len(batch) if isinstance(k, int) else k for k in (self.input_key, self.target_key)}
        for key in keys:
            value = batch[key]
            if key not in skip and isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
                set_entry(batch, key, torch.cat([value, value]), "companion")
