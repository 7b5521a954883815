"""The MixUp callback (Zhang et al., 2018, https://arxiv.org/abs/1710.09412), with manifold mixing."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_reg._batch import BatchKey
from lightning_reg.callbacks._mixing import MixingCallback, MixMode, TargetMode
from lightning_reg.functional._apply import blend, broadcast_lam
from lightning_reg.functional._checks import check_alpha
from lightning_reg.functional.mixup import MixingParams, Pairing, sample_mixup

__all__ = ["MixUp"]


class MixUp(MixingCallback):
    """MixUp: train on convex combinations ``lam * x + (1 - lam) * x[index]`` of sample pairs and of their targets.

    Args:
        alpha: concentration of ``Beta(alpha, alpha)``; 0.2 is the ImageNet recipe, 1.0 uniform.
        num_classes: ``K``; defaults to the module's ``num_classes`` attribute or hyperparameter.
        prob: fraction of training batches that are mixed.
        per_sample: one lambda per sample instead of one per batch.
        label_smoothing: smoothing folded into the one-hot targets (or use the ``LabelSmoothing`` callback).
        input_key: where the inputs are in the batch (list position or dict key).
        target_key: where the targets are.
        last_epoch: from this epoch (0-based) on, no mixing and targets are left as they come.
        layer: manifold mixing: the name of a submodule (from ``named_modules()``) whose output is mixed instead
            of the inputs, e.g. the embedding of a model whose inputs are token ids.
        inplace: overwrite the batch's input tensor (saves memory, not time; only safe when the loader builds a
            new batch each step).
        pairing: ``"shift"`` (sample ``i`` with ``(i + k) % N``, needs shuffled batches) or ``"permutation"``
            (a random derangement, for batches in any order).
        multi_label: the targets are multi-hot rows ``(N, K)``, smoothed per entry towards 1/2 (timm's).
        mode: ``"batch"``, ``"elem"`` (lambda and apply drawn per sample) or ``"pair"`` (per mutual pair), as
            timm's ``mode``.
        target_mode: ``"mixed"`` (the targets are mixed like the inputs) or ``"dominant"`` (the one-hot label of
            the larger weight, torch-uncertainty's ``MixupIO``).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MixUp(alpha=0.2, num_classes=10)], logger=False)

    Notes:
        Training batches only; their targets become ``(N, K)`` probabilities, also on the batches not mixed, and
        integer inputs other than ``uint8`` images are refused (mix an embedding with ``layer=``). Logs
        ``mixup/mixed_fraction`` and ``mixup/lambda`` per epoch. Pairings, speed, state and DDP:
        docs/mixup.md and docs/mixing.md.
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
        self.alpha = check_alpha(alpha)
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"Expected `layer` to be a submodule name (str) or None, but got {layer!r}.")
        self.per_sample = bool(per_sample)
        self.layer = layer
        self.inplace = bool(inplace)
        self._module: nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._buffer: Tensor | None = None

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "layer": self.layer}  # two MixUps may mix two layers

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup(trainer, pl_module, stage, needs_classes=True)
        if stage == "fit" and self.layer is not None:
            modules = dict(pl_module.named_modules())
            if self.layer not in modules or self.layer == "":
                close = _close_names(self.layer, [name for name in modules if name])
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
            self._check_blendable(inputs)
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
            return blend(inputs, params.lam, params.index, params.shift, out=self._mix_out(inputs))
        if self._buffer is None or self._buffer.shape != inputs.shape or self._buffer.dtype != inputs.dtype:
            self._buffer = torch.empty_like(inputs) if torch.is_floating_point(inputs) else None
        return blend(inputs, params.lam, params.index, params.shift, out=inputs, scratch=self._buffer)

    def _hook_layer(self, lam: float | Tensor, index: Tensor) -> None:
        assert self._module is not None  # resolved in setup
        self._remove_hook()

        def mix_output(module: nn.Module, args: Any, output: Any) -> Tensor:
            self._remove_hook()  # once per training step
            if not isinstance(output, Tensor) or output.ndim < 1 or output.shape[0] != len(index):
                got = (
                    f"a tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
                )
                raise TypeError(
                    f"MixUp(layer={self.layer!r}) expects that submodule to return one tensor (N, ...) with N="
                    f"{len(index)}, but it returned {got}. Pick a layer that outputs a tensor."
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


def _close_names(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    """The entries of ``names`` closest to ``name`` (difflib), best first, for "did you mean" messages.

    Example:
        >>> _close_names("net.embeding", ["net", "net.embedding", "net.blocks.0.attn"])
        ['net.embedding']
    """
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if not close:  # a typo in the last part of a dotted name: match on that part alone
        tails = {candidate.rsplit(".", 1)[-1]: candidate for candidate in names}
        close = [tails[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=n, cutoff=0.6)]
    return close
