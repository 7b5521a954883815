"""The MixUp callback (Zhang et al., 2018, https://arxiv.org/abs/1710.09412), with manifold mixing."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_reg._batch import BatchKey
from lightning_reg.callbacks._mixing import MixingCallback, MixMode, TargetMode, close_names
from lightning_reg.functional.mixup import MixingParams, Pairing, _check_alpha, apply_mixup, broadcast_lam, sample_mixup

__all__ = ["MixUp"]


class MixUp(MixingCallback):
    """MixUp: train on convex combinations of sample pairs and of their targets.

    In ``on_train_batch_start`` the callback draws lambda from ``Beta(alpha, alpha)`` and a random pairing from
    its own generator, then replaces the batch's inputs by ``lam * x + (1 - lam) * x[index]`` and its targets
    by the same blend of one-hot rows: ``(N, K)`` probabilities that ``F.cross_entropy`` takes as they are.
    Validation, test and predict batches are untouched. Batches it does not mix (``prob``, a batch of one sample)
    still get one-hot (smoothed) targets while mixing is on, so a training epoch sees one kind of target.
    Integer inputs other than ``uint8`` images (token ids) are refused: mix an embedding with ``layer=``.

    Args:
        alpha: concentration of ``Beta(alpha, alpha)``; 0.2 is the ImageNet recipe, 1.0 uniform.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches that are mixed.
        per_sample: one lambda per sample instead of one per batch.
        label_smoothing: smoothing folded into the one-hot targets (or use the ``LabelSmoothing`` callback).
        input_key: where the inputs are in the batch (list position or dict key).
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing and targets are left as they come.
        layer: manifold mixing: the name of a submodule (as in ``named_modules()``) whose output is mixed
            during the training step instead of the raw inputs, e.g. the embedding of a sequence model whose
            inputs are token ids.
        inplace: overwrite the batch's input tensor instead of writing a new one: saves the memory of one batch,
            not time. Off by default, since it is only safe when the DataLoader builds a new batch each step
            (the default collate does), not when the dataset hands out tensors it keeps (which the callback
            cannot tell apart). By default the mixed inputs go to an output tensor the callback owns and reuses
            whenever nothing holds the previous one any more, which costs no more than mixing in place.
        pairing: ``"shift"`` pairs sample ``i`` with ``(i + k) % N`` for a random ``k`` drawn per batch (one blend
            pass, no gather; needs batches in random order, as timm's and torchvision's pairings do);
            ``"permutation"`` draws a uniformly random derangement (no sample paired with itself), robust to
            batches in a fixed order (e.g. an unshuffled loader sorted by class), at the cost of gathering the
            partners. See :func:`~lightning_reg.functional.mixup.sample_mixup`.
        multi_label: the targets are multi-hot rows ``(N, K)`` of independent labels: mixed as they are and
            smoothed per entry towards 1/2 (timm's ``multi_label``).
        mode: ``"batch"`` (default): one apply draw per batch; ``"elem"``: lambda and apply drawn per sample
            (timm's ``mode="elem"``); ``"pair"``: per mutual pair of samples (timm's ``mode="pair"``; with
            ``pairing="shift"`` the pairs are timm's ``i, N - 1 - i``, with ``"permutation"`` a random matching).
        target_mode: ``"mixed"`` (default): the targets are mixed like the inputs; ``"dominant"``: each mixed
            sample keeps the (smoothed) one-hot label of the sample with the larger weight, as torch-uncertainty's
            ``MixupIO`` (Wang et al., CVPR 2023; see docs/calibration.md).

    Logs ``mixup/mixed_fraction`` and ``mixup/lambda`` once per training epoch (see ``callbacks/_mixing.py``).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MixUp(alpha=0.2, num_classes=10)], logger=False)
    """

    log_name = "mixup"

    def __init__(
        self,
        alpha: float = 0.2,
        *,
        num_classes: int | None = None,
        prob: float = 1.0,
        per_sample: bool = False,
        label_smoothing: float = 0.0,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        last_epoch: int | None = None,
        layer: str | None = None,
        inplace: bool = False,
        pairing: Pairing = "shift",
        multi_label: bool = False,
        mode: MixMode = "batch",
        target_mode: TargetMode = "mixed",
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
        self.alpha = _check_alpha(alpha)
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"Expected `layer` to be a submodule name (str) or None, but got {layer!r}.")
        self.per_sample = bool(per_sample)
        self.layer = layer
        self.inplace = bool(inplace)
        self._module: nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._buffer: Tensor | None = None

    def _state_key_fields(self) -> dict[str, Any]:
        fields = {"alpha": self.alpha, "per_sample": self.per_sample, "layer": self.layer}
        return {**fields, **super()._state_key_fields()}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage, needs_classes=True)
        if stage == "fit" and self.layer is not None:
            modules = dict(pl_module.named_modules())
            if self.layer not in modules or self.layer == "":
                close = close_names(self.layer, [name for name in modules if name])
                hint = f"Did you mean {' or '.join(repr(c) for c in close)}?" if close else "No name is close to it."
                raise ValueError(
                    f"MixUp(layer={self.layer!r}): {type(pl_module).__name__} has no submodule of that name "
                    f"({len(modules) - 1} submodules). {hint} `layer` takes a name from `named_modules()`."
                )
            self._module = modules[self.layer]

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        begun = self._begin(trainer, pl_module, batch, read_inputs=self.layer is None)
        if begun is None:
            return
        inputs, targets = begun
        if inputs is not None:
            check_blendable(inputs, self.input_key)
        n = len(targets.targets_a) if not isinstance(targets, Tensor) else targets.shape[0]
        device = inputs.device if inputs is not None else pl_module.device
        lam_dtype = self._lam_dtype(trainer, inputs)
        if self.mode != "batch":
            weight, _, kept, index, shift = self._elem_draws(
                n, mixup_alpha=self.alpha, cutmix_alpha=None, switch_prob=0.0, sizes=None, lam_dtype=lam_dtype
            )
            params = MixingParams(weight, index, shift)
            lam_cpu: float | Tensor = kept
        else:
            params = sample_mixup(
                n, self.alpha, per_sample=self.per_sample, pairing=self.pairing, generator=self.generator
            )
            params = MixingParams(self._round_lam(params.lam, lam_dtype), params.index, params.shift)
            lam_cpu = params.lam
        on_device = self._to_device(params, device)
        # Targets first, inputs last: the forward pass reads the inputs next, while they are still in cache.
        mixed = self._mixed_targets(pl_module, targets, on_device.lam, on_device.index, on_device.shift)
        self._write(batch, self.target_key, mixed, "target_key")
        if inputs is None:
            self._hook_layer(on_device.lam, on_device.index)
        else:
            self._write(batch, self.input_key, self._mix_inputs(inputs, on_device), "input_key")
        self._record(lam_cpu)

    def _mix_inputs(self, inputs: Tensor, params: MixingParams) -> Tensor:
        if not self.inplace or inputs.requires_grad:
            return apply_mixup(inputs, params, out=self._mix_out(inputs))
        if self._buffer is None or self._buffer.shape != inputs.shape or self._buffer.dtype != inputs.dtype:
            self._buffer = torch.empty_like(inputs) if torch.is_floating_point(inputs) else None
        return apply_mixup(inputs, params, inplace=True, buffer=self._buffer)

    def _hook_layer(self, lam: float | Tensor, index: Tensor) -> None:
        assert self._module is not None  # resolved in setup
        self._remove_hook()

        def mix_output(module: nn.Module, args: Any, output: Any) -> Tensor:
            self._remove_hook()  # once per training step
            if not isinstance(output, Tensor) or output.ndim < 1 or output.shape[0] != len(index):
                raise TypeError(
                    f"MixUp(layer={self.layer!r}) expects that submodule to return one tensor (N, ...) with N="
                    f"{len(index)}, but it returned {type(output).__name__}. Pick a layer that outputs a tensor."
                )
            idx = index.to(output.device)  # already there when the layer runs on the module's device
            return torch.lerp(output[idx], output, broadcast_lam(lam, output))

        self._hook = self._module.register_forward_hook(mix_output)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._hook is not None:
            self._remove_hook()
            rank_zero_warn(
                f"MixUp(layer={self.layer!r}): the layer did not run in the training step; nothing was mixed."
            )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._buffer = None
        super().teardown(trainer, pl_module, stage)


def check_blendable(inputs: Tensor, input_key: BatchKey, owner: str = "MixUp") -> None:
    """Refuse integer inputs other than ``uint8`` images: blending token ids makes other (wrong) token ids.

    ``uint8`` inputs are images, blended in float32 and rounded back (timm's ``FastCollateMixup``).
    """
    if torch.is_floating_point(inputs) or inputs.dtype == torch.uint8:
        return
    raise TypeError(
        f"{owner} cannot blend batch[{input_key!r}] of dtype {inputs.dtype} (integer inputs, such as token ids): "
        "a blend of two ids is a third, unrelated id. Mix a floating representation instead: "
        f"`{owner}(layer='<name of the embedding>')` mixes that submodule's output (manifold mixing), e.g. "
        "`layer='embedding'`. uint8 images are blended as images."
    )
