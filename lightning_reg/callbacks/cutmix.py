"""The CutMix callback (Yun et al., 2019, https://arxiv.org/abs/1905.04899)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry, validate_key
from lightning_reg.callbacks._mixing import MixingCallback, MixMode, TargetMode
from lightning_reg.functional._apply import kept_fraction, kept_one, paste, to_device
from lightning_reg.functional._checks import check_alpha, check_dims, check_minmax, resolve_dims
from lightning_reg.functional.cutmix import Box, Layout, sample_box
from lightning_reg.functional.mixup import MixingParams, Pairing, sample_mixup
from lightning_reg.mixins import MixedTargets

__all__ = ["CutMix"]

Carry = Literal["cut", "keep"]


def _check_carry(carry: object) -> dict[BatchKey, Carry]:
    if carry is None:
        return {}
    if isinstance(carry, Mapping):
        entries = dict(carry)
    elif isinstance(carry, Sequence) and not isinstance(carry, str):
        entries = dict.fromkeys(carry, "cut")
    else:
        raise TypeError(f"Expected `carry` as batch keys or a mapping key -> 'cut' | 'keep', but got {carry!r}.")
    for key, how in entries.items():
        validate_key(key, "carry")
        if how not in ("cut", "keep"):
            raise ValueError(f"Expected `carry[{key!r}]` to be 'cut' or 'keep', but got {how!r}.")
    return entries


class CutMix(MixingCallback):
    """CutMix: paste a random box of the partner sample; targets are mixed by the area actually kept.

    Args:
        alpha: concentration of ``Beta(alpha, alpha)`` for the kept fraction; 1.0 is the paper's uniform.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches (with ``mode="elem"``: samples) that are mixed.
        per_sample: a lambda and a box per sample instead of one per batch.
        label_smoothing: smoothing folded into the one-hot targets (or use ``LabelSmoothing``).
        input_key: where the inputs are in the batch (list position or dict key).
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing and targets are left as they come.
        dims: the axes to cut along, or a layout: ``"NT"``, ``"NTD"``, ``"NCHW"``, ``"NCDHW"`` (volumes) or
            ``"NTCHW"`` (videos); required for 5-D inputs.
        inplace: paste into the batch's input tensor (see :class:`MixUp`).
        pairing: ``"shift"`` or ``"permutation"`` (see :class:`MixUp`).
        multi_label: multi-hot targets (see :class:`MixUp`).
        mode: ``"batch"``, ``"elem"`` or ``"pair"`` (see :class:`MixUp`).
        target_mode: ``"mixed"`` or ``"dominant"`` (see :class:`MixUp`).
        cutmix_minmax: timm's ``(lo, hi)``: box sides drawn uniformly between ``lo`` and ``hi`` times each length
            instead of from ``alpha``.
        correct_lam: mix the targets by the area kept after clipping at the borders (default), or by lambda as
            drawn (``False``, timm's ``correct_lam=False``).
        carry: batch entries that follow the cut, e.g. ``["attention_mask"]`` (keys, or a mapping to ``"cut"`` /
            ``"keep"``).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, num_classes=10)], logger=False)

    Notes:
        Training batches only. The box covers the last two dims of images and a span of the time axis of
        sequences; a sequence batch entry shaped like the time axis, or integer lengths, must be named in
        ``carry``. Logs ``cutmix/mixed_fraction`` and ``cutmix/lambda`` (the mean area kept) per epoch. See
        docs/mixing.md.
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
        super().__init__(
            num_classes=num_classes,
            prob=prob,
            label_smoothing=label_smoothing,
            input_key=input_key,
            target_key=target_key,
            last_epoch=last_epoch,
            pairing=pairing,
            multi_label=multi_label,
            mode=mode,
            target_mode=target_mode,
        )
        self.alpha = check_alpha(alpha)
        self.per_sample = bool(per_sample)
        self.dims = check_dims(dims)
        self.inplace = bool(inplace)
        self.cutmix_minmax = check_minmax(cutmix_minmax) if cutmix_minmax is not None else None
        self.correct_lam = bool(correct_lam)
        self.carry = _check_carry(carry)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage, needs_classes=True)

    def _prepare(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any
    ) -> tuple[Tensor, Tensor | MixedTargets] | None:
        """Read and check the batch; ``None`` when it is not mixed (its targets are written already)."""
        begun = self._begin(trainer, pl_module, batch)
        if begun is None:
            return None
        inputs, targets = begun
        assert inputs is not None
        return inputs, targets

    # --- companions ----------------------------------------------------------------------------------
    def _companions(self, batch: Any, inputs: Tensor, axes: tuple[int, ...]) -> dict[BatchKey, Tensor]:
        """The entries to cut along with the inputs; raise for position entries that would go stale."""
        n = inputs.shape[0]
        found: dict[BatchKey, Tensor] = {}
        for key, how in self.carry.items():
            if how != "cut":
                continue
            entry = get_entry(batch, key, "carry")
            if not isinstance(entry, Tensor) or entry.ndim <= max(axes) or entry.shape[0] != n:
                got = tuple(entry.shape) if isinstance(entry, Tensor) else type(entry).__name__
                hint = (
                    " Sequence lengths cannot follow a cut: a pasted span can leave padding inside a sequence. Give "
                    "the model a padding mask (N, T) and carry that, or mix an embedding with `MixUp(layer=...)`."
                    if isinstance(entry, Tensor) and entry.ndim == 1
                    else ""
                )
                raise ValueError(
                    f"CutMix(carry=[{key!r}]): expected a tensor with the inputs' batch size {n} and the cut axes "
                    f"{axes} (such as a padding mask), but got {got}.{hint}"
                )
            if any(entry.shape[d] != inputs.shape[d] for d in axes):
                raise ValueError(
                    f"CutMix(carry=[{key!r}]): its shape {tuple(entry.shape)} differs from the inputs' "
                    f"{tuple(inputs.shape)} along the cut axes {axes}."
                )
            found[key] = entry
        if axes == (1,) and inputs.ndim in (2, 3):
            self._refuse_stale_positions(batch, inputs)
        return found

    def _refuse_stale_positions(self, batch: Any, inputs: Tensor) -> None:
        n, t = inputs.shape[0], inputs.shape[1]
        items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
        for key, entry in items:
            if key in (self.input_key, self.target_key) or key in self.carry or not isinstance(entry, Tensor):
                continue
            if entry.shape == (n, t):
                raise ValueError(
                    f"CutMix cuts spans of the time axis of batch[{self.input_key!r}] {tuple(inputs.shape)}, and "
                    f"batch[{key!r}] {tuple(entry.shape)} looks like a padding or attention mask of those steps: it "
                    f"would no longer match the tokens. Pass `carry=[{key!r}]` to cut it with the same spans, or "
                    f"`carry={{{key!r}: 'keep'}}` if it is not about positions."
                )
            if entry.shape == (n,) and not torch.is_floating_point(entry) and entry.dtype != torch.bool:
                raise ValueError(
                    f"CutMix cuts spans of the time axis of batch[{self.input_key!r}] {tuple(inputs.shape)}, and "
                    f"batch[{key!r}] {tuple(entry.shape)} looks like sequence lengths: a pasted span from a "
                    "sequence of another length leaves padding inside the sequence (or tokens past its length), "
                    "which lengths cannot describe. Use a padding mask (N, T) with `carry=[...]`, or mix an "
                    f"embedding with `MixUp(layer=...)`; map `carry={{{key!r}: 'keep'}}` if it is not lengths."
                )

    # --- mixing --------------------------------------------------------------------------------------
    def _kept(self, params: MixingParams, kept: float | Tensor) -> float | Tensor:
        """The target weight: the area kept, or lambda as drawn with ``correct_lam=False`` (not with minmax)."""
        if self.correct_lam or self.cutmix_minmax is not None:
            return kept
        return params.lam.to(torch.float32) if isinstance(params.lam, Tensor) else params.lam

    def _cut(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        inputs: Tensor,
        targets: Tensor | MixedTargets,
        alpha: float,
        dims: Sequence[int] | str | None,
    ) -> None:
        n = inputs.shape[0]
        axes = resolve_dims(inputs, dims)
        params = sample_mixup(n, alpha, per_sample=self.per_sample, pairing=self.pairing, generator=self.generator)
        sizes = [inputs.shape[d] for d in axes]
        box = sample_box(params.lam, sizes, generator=self.generator, minmax=self.cutmix_minmax)
        kept: float | Tensor
        if box.lo.shape[0] == 1 and not isinstance(params.lam, Tensor):  # one box: Python ints, no tensor ops
            kept = kept_one(box.lo[0].tolist(), box.hi[0].tolist(), sizes)
        else:
            kept = kept_fraction(box.lo, box.hi, sizes).to(torch.float32)
        kept = self._kept(params, kept)
        self._apply_cut(pl_module, batch, inputs, targets, MixingParams(kept, params.index, params.shift), box, axes)
        self._record(kept, cutmix=True)

    def _apply_cut(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        inputs: Tensor,
        targets: Tensor | MixedTargets,
        params: MixingParams,
        box: Box,
        axes: tuple[int, ...],
    ) -> None:
        """Paste ``box`` (CPU draws) into the inputs and the carried entries; mix the targets by ``params.lam``."""
        companions = self._companions(batch, inputs, axes)
        on_device = self._to_device(params, inputs.device)
        if box.lo.shape[0] > 1:  # per-sample boxes are read on the device; one box is read as Python ints
            box = Box(to_device(box.lo, inputs.device), to_device(box.hi, inputs.device))
        # Targets first (mixed by the fraction actually kept after the box is clipped), inputs last: the forward
        # pass reads the inputs next, while they are still in cache.
        mixed_targets = self._mixed_targets(pl_module, targets, on_device.lam, on_device.index, on_device.shift)
        self._write(batch, self.target_key, mixed_targets, "target_key")
        for key, entry in companions.items():
            self._write(batch, key, self._paste(entry, on_device, box, axes), "carry")
        inplace = self.inplace and not inputs.requires_grad
        mixed = self._paste(inputs, on_device, box, axes, out=inputs if inplace else self._mix_out(inputs))
        self._write(batch, self.input_key, mixed, "input_key")

    @staticmethod
    def _paste(
        entry: Tensor, params: MixingParams, box: Box, axes: tuple[int, ...], out: Tensor | None = None
    ) -> Tensor:
        return paste(entry, box.lo, box.hi, params.index, params.shift, axes, out=out)

    def _cut_elem(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        inputs: Tensor,
        targets: Tensor | MixedTargets,
    ) -> None:
        axes = resolve_dims(inputs, self.dims)
        _, box, kept, index, shift = self._elem_draws(
            inputs.shape[0],
            mixup_alpha=None,
            cutmix_alpha=self.alpha,
            switch_prob=1.0,
            sizes=[inputs.shape[d] for d in axes],
            minmax=self.cutmix_minmax,
            correct_lam=self.correct_lam,
        )
        assert box is not None
        self._apply_cut(pl_module, batch, inputs, targets, MixingParams(kept, index, shift), box, axes)
        self._record(kept, cutmix=True)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        prepared = self._prepare(trainer, pl_module, batch)
        if prepared is None:
            return
        inputs, targets = prepared
        if self.mode != "batch":
            self._cut_elem(pl_module, batch, inputs, targets)
            return
        self._cut(pl_module, batch, inputs, targets, self.alpha, self.dims)
