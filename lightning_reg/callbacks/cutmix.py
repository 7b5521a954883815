"""The CutMix callback (Yun et al., 2019, https://arxiv.org/abs/1905.04899)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry
from lightning_reg.callbacks._mixing import MixingCallback
from lightning_reg.functional.cutmix import apply_cutmix, sample_cutmix_box
from lightning_reg.functional.mixup import Pairing, _check_alpha, sample_mixup
from lightning_reg.mixins import MixedTargets

__all__ = ["CutMix"]


class CutMix(MixingCallback):
    """CutMix: paste a random box of the partner sample; targets are mixed by the area actually kept.

    The box covers the last two dims of images ``(N, C, H, W)``, the last three of volumes
    ``(N, C, D, H, W)``, or a span of the time axis (dim 1) of sequences ``(N, T)`` / ``(N, T, D)``;
    ``dims`` picks other axes. Only training batches are changed. With ``per_sample=True`` every sample gets
    its own lambda and box (vectorized).

    Args:
        alpha: concentration of ``Beta(alpha, alpha)`` for the kept fraction; 1.0 is the paper's uniform.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches that are mixed.
        per_sample: a lambda and a box per sample instead of one per batch.
        label_smoothing: smoothing folded into the one-hot targets (or use ``LabelSmoothing``).
        input_key: where the inputs are in the batch (list position or dict key).
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing and targets are left as they come.
        dims: the axes to cut along; the default depends on the number of input dims (see above).
        inplace: paste into the batch's input tensor instead of a copy (see :class:`MixUp`).
        pairing: ``"shift"`` or ``"permutation"`` (see :class:`MixUp`).

    Logs ``cutmix/mixed_fraction`` and ``cutmix/lambda`` (the mean area kept) once per training epoch.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, num_classes=10)], logger=False)
    """

    log_name = "cutmix"

    def __init__(
        self,
        alpha: float = 1.0,
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
        super().__init__(
            num_classes=num_classes,
            prob=prob,
            label_smoothing=label_smoothing,
            input_key=input_key,
            target_key=target_key,
            last_epoch=last_epoch,
            pairing=pairing,
        )
        self.alpha = _check_alpha(alpha)
        self.per_sample = bool(per_sample)
        self.dims = tuple(dims) if dims is not None else None
        self.inplace = bool(inplace)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "per_sample": self.per_sample, "dims": self.dims, **super()._state_key_fields()}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage, needs_classes=True)

    def _prepare(self, pl_module: L.LightningModule, batch: Any) -> tuple[Tensor, Tensor | MixedTargets] | None:
        """Read and check the batch; ``None`` when it is too small to mix."""
        raw = get_entry(batch, self.target_key, "target_key")
        targets = raw if isinstance(raw, MixedTargets) else self._read_targets(batch)
        n = len(targets.targets_a) if isinstance(targets, MixedTargets) else targets.shape[0]
        inputs = self._read_inputs(batch, n)
        if self._batch_too_small(n):
            self._record()
            return None
        return inputs, targets

    def _cut(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        inputs: Tensor,
        targets: Tensor | MixedTargets,
        alpha: float,
        dims: Sequence[int] | None,
    ) -> None:
        n = inputs.shape[0]
        params = sample_mixup(n, alpha, per_sample=self.per_sample, pairing=self.pairing, generator=self.generator)
        box, kept = sample_cutmix_box(inputs, params.lam, generator=self.generator, dims=dims)
        # Targets first (mixed by the fraction actually kept after the box is clipped), inputs last: the forward
        # pass reads the inputs next, while they are still in cache.
        self._write(batch, self.target_key, self._mixed_targets(pl_module, targets, kept, params.index), "target_key")
        inplace = self.inplace and not inputs.requires_grad
        out = None if inplace else self._mix_out(inputs)
        mixed, _ = apply_cutmix(inputs, params, box=box, dims=dims, inplace=inplace, out=out)
        self._write(batch, self.input_key, mixed, "input_key")
        self._record(kept, cutmix=True)

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
        self._cut(pl_module, batch, inputs, targets, self.alpha, self.dims)
