"""Shared machinery of the mixing and smoothing callbacks: generator, state, num_classes, batch access.

Every callback owns a CPU ``torch.Generator`` seeded from (Lightning's seed, global rank, a salt from its
``state_key``): reproducible under ``seed_everything`` and different on every DDP rank. Its state is saved in
``state_dict()`` as a uint8 tensor and ints, so a checkpoint loads with ``torch.load(weights_only=True)`` and a
resumed run draws what an uninterrupted run would.

Smoothing once: label smoothing is linear, so it commutes with mixing. ``LabelSmoothing`` smooths whatever
targets reach it (indices or probabilities) exactly once, before or after a mixing callback. Two sources of
smoothing (a ``LabelSmoothing`` callback and a mixing callback's ``label_smoothing``, or the module's own
``label_smoothing``) would smooth twice: :func:`check_single_smoothing` rejects that at fit start.

Speed: the mixed inputs and the dense mixed targets are written into callback-owned tensors
(:class:`ReusableOutput`) that are reused on the next batch only when nothing else refers to their memory any
more (the training step, its autograd graph, views, a user who kept the batch): so a batch someone still holds
is never overwritten, and in the usual loop (batch consumed, graph freed) nothing new is allocated: on a large
batch a fresh allocation costs more than the blend itself (page faults).

Logging: at the end of every training epoch a mixing callback logs through ``pl_module.log`` (``on_step=False,
on_epoch=True``, averaged over ranks) ``{name}/mixed_fraction``, the fraction of training batches it mixed, and
``{name}/lambda``, the mean weight kept on the original samples over the training batches (1 for a batch it
did not mix), where ``name`` is ``mixup``, ``cutmix`` or ``mixup_cutmix`` (which also logs
``mixup_cutmix/cutmix_fraction``, the fraction of training batches mixed by CutMix). Both are defined for every
epoch, so every rank logs the same keys. The cost is a few float additions a batch and one log call an epoch.
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry, set_entry, validate_key
from lightning_reg._random import base_seed, rank_generator
from lightning_reg.callbacks._strategy import data_parallel_rank
from lightning_reg.functional.label_smoothing import check_targets, mixed_one_hot, one_hot
from lightning_reg.functional.mixup import Pairing, check_pairing
from lightning_reg.mixins import MixedTargets

__all__ = ["MixingCallback", "ReusableOutput", "check_single_smoothing", "resolve_num_classes"]

# The number of references to a tensor's storage (torch's own count). Private to torch, hence looked up
# defensively: without it, ReusableOutput never reuses (always allocates), which is safe.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class ReusableOutput:
    """A private output tensor, handed out again only when nothing else refers to its memory.

    :meth:`take` returns an alias (a view) of a tensor this object owns. Whatever keeps the alias, a view of it,
    or anything else built on its memory (an autograd graph that saved it, ``.numpy()``, ``.detach()``) holds a
    reference to the storage, which torch counts; the next :meth:`take` reuses the memory only when the count
    says that the owner is the last one, and otherwise allocates a new tensor and leaves the old one to its
    holders. So reuse never changes a tensor someone can still read.

    Example:
        >>> out = ReusableOutput()
        >>> a = out.take(torch.zeros(2, 3))
        >>> b = out.take(torch.zeros(2, 3))  # `a` is alive: new memory
        >>> a.data_ptr() != b.data_ptr()
        True
        >>> ptr = b.data_ptr()
        >>> del a, b
        >>> out.take(torch.zeros(2, 3)).data_ptr() == ptr  # nothing holds the last one: reused
        True
    """

    def __init__(self) -> None:
        self._tensor: Tensor | None = None

    def take(self, like: Tensor) -> Tensor | None:
        """A tensor like ``like`` (its memory layout too) that nobody else holds; ``None`` if ``like`` requires grad.

        (``out=`` kernels record no autograd history, so inputs that require grad are mixed into new tensors.)
        """
        if like.requires_grad:
            return None
        if not self._reusable(like.shape, like.dtype, like.device):
            self._tensor = torch.empty_like(like)
        assert self._tensor is not None
        return self._tensor.view(self._tensor.shape)

    def take_empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``, ``dtype`` and ``device`` that nobody else holds."""
        if not self._reusable(shape, dtype, device):
            self._tensor = torch.empty(shape, dtype=dtype, device=device)
        assert self._tensor is not None
        return self._tensor.view(self._tensor.shape)

    def _reusable(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the owned tensor has this shape, dtype and device, and nothing but this object holds it."""
        t = self._tensor
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device or _storage_use_count is None:
            return False
        storage = t.untyped_storage()  # holds one reference while we count
        return int(_storage_use_count(storage._cdata)) == 2  # `t` itself and `storage`

    def release(self) -> None:
        """Drop the owned tensor (its memory goes back once its other holders let go)."""
        self._tensor = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_tensor": None}  # a scratch tensor is not state: never pickled or deep-copied


def resolve_num_classes(num_classes: int | None, pl_module: L.LightningModule, owner: str) -> int:
    """``num_classes`` if given, else the module's ``num_classes`` attribute or hyperparameter."""
    if num_classes is None:
        num_classes = getattr(pl_module, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"{owner} needs the number of classes to one-hot encode the targets, but got {num_classes!r} "
            f"(from the argument, then `{type(pl_module).__name__}.num_classes`, then its hparams). "
            f"Pass `{owner}(num_classes=K)` or set `self.num_classes = K` in your LightningModule."
        )
    return num_classes


def check_single_smoothing(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise ``ValueError`` when more than one thing would smooth the labels."""
    from lightning_reg.callbacks.label_smoothing import LabelSmoothing

    sources = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, LabelSmoothing) and cb.smoothing > 0:
            sources.append(f"LabelSmoothing({cb.smoothing})")
        elif isinstance(cb, MixingCallback) and cb.label_smoothing > 0:
            sources.append(f"{type(cb).__name__}(label_smoothing={cb.label_smoothing})")
    module_smoothing = getattr(pl_module, "label_smoothing", 0.0)
    if isinstance(module_smoothing, int | float) and module_smoothing > 0 and sources:
        sources.append(f"{type(pl_module).__name__}.label_smoothing={module_smoothing}")
    if len(sources) > 1:
        raise ValueError(
            f"Labels would be smoothed more than once, by {', '.join(sources)}. Keep exactly one: a "
            "`LabelSmoothing` callback (it composes with mixing in either order), or `label_smoothing=` of the "
            "mixing callback, or the module's own `label_smoothing`."
        )


class MixingCallback(L.Callback):
    """Base of the batch-transforming callbacks: generator, state, keys, checks. Not for direct use."""

    #: Prefix of the logged epoch statistics; empty for no logging.
    log_name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        num_classes: int | None,
        prob: float,
        label_smoothing: float,
        input_key: BatchKey,
        target_key: BatchKey,
        last_epoch: int | None,
        pairing: Pairing = "shift",
    ) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"Expected `num_classes` to be an int >= 2 or None, but got {num_classes!r}.")
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"Expected `prob` to be a float in [0, 1], but got {prob!r}.")
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, int | float)
            or not 0 <= label_smoothing < 1
        ):
            raise ValueError(f"Expected `label_smoothing` to be a float in [0, 1), but got {label_smoothing!r}.")
        validate_key(input_key, "input_key")
        validate_key(target_key, "target_key")
        if last_epoch is not None and (
            isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0
        ):
            raise ValueError(f"Expected `last_epoch` to be an int >= 0 or None, but got {last_epoch!r}.")
        self.num_classes = num_classes
        self.prob = float(prob)
        self.label_smoothing = float(label_smoothing)
        self.input_key = input_key
        self.target_key = target_key
        self.last_epoch = last_epoch
        self.pairing = check_pairing(pairing)
        self._num_classes: int | None = num_classes
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._warned_small_batch = False
        self._output = ReusableOutput()  # mixed inputs
        self._target_output = ReusableOutput()  # dense mixed targets
        self._stats = {"batches": 0.0, "mixed": 0.0, "lambda": 0.0, "cutmix": 0.0}

    # --- identity and state ------------------------------------------------------------------------
    def _state_key_fields(self) -> dict[str, Any]:
        return {"prob": self.prob, "input_key": self.input_key, "target_key": self.target_key}

    @property
    def state_key(self) -> str:
        """Distinct per configuration, so that two instances of one class keep separate states."""
        return self._generate_state_key(**self._state_key_fields())

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor) and the seed: loads with ``torch.load(weights_only=True)``."""
        if self._generator is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"generator_state": self._generator.get_state(), "seed": self._seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator, now or at ``setup`` when it does not exist yet."""
        if "generator_state" not in state_dict:
            return
        if self._generator is None:
            self._pending_state = dict(state_dict)
        else:
            self._generator.set_state(state_dict["generator_state"])

    # --- setup -------------------------------------------------------------------------------------
    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, *, needs_classes: bool) -> None:
        if stage != "fit":
            return
        if needs_classes:
            self._num_classes = resolve_num_classes(self.num_classes, pl_module, type(self).__name__)
        check_single_smoothing(trainer, pl_module)
        self._seed = base_seed()
        salt = zlib.crc32(self.state_key.encode())
        self._generator = rank_generator(self._seed, data_parallel_rank(trainer), stream=salt)
        if self._pending_state is not None:
            self._generator.set_state(self._pending_state["generator_state"])
            self._pending_state = None

    @property
    def generator(self) -> torch.Generator:
        """The callback's generator; exists from ``setup`` (fit) on."""
        if self._generator is None:
            raise RuntimeError(f"{type(self).__name__} is used before `setup`: let the Trainer run `fit`.")
        return self._generator

    # --- per batch ---------------------------------------------------------------------------------
    def _active(self, trainer: L.Trainer) -> bool:
        return self.last_epoch is None or trainer.current_epoch < self.last_epoch

    def _read_targets(self, batch: Any) -> Tensor:
        return check_targets(get_entry(batch, self.target_key, "target_key"), f"batch[{self.target_key!r}] (targets)")

    def _read_inputs(self, batch: Any, n: int) -> Tensor:
        inputs = get_entry(batch, self.input_key, "input_key")
        if not isinstance(inputs, Tensor) or inputs.ndim < 1:
            raise TypeError(
                f"Expected batch[{self.input_key!r}] (inputs) to be a tensor of shape (N, ...), but got "
                f"{type(inputs).__name__}. Point `input_key` at the input tensor of the batch."
            )
        if inputs.shape[0] != n:
            raise ValueError(
                f"Expected inputs and targets with the same batch size, but got {inputs.shape[0]} inputs "
                f"(batch[{self.input_key!r}]) and {n} targets (batch[{self.target_key!r}]). Check `input_key` "
                "and `target_key`."
            )
        return inputs

    def _batch_too_small(self, n: int) -> bool:
        if n >= 2:
            return False
        if not self._warned_small_batch:
            rank_zero_warn(f"{type(self).__name__} skips batches of size {n}: there is no partner to mix with.")
            self._warned_small_batch = True
        return True

    def _draw_apply(self) -> bool:
        """One draw per batch decides whether this batch is mixed (no draw when ``prob`` is 1)."""
        if self.prob >= 1.0:
            return True
        return bool(torch.rand((), generator=self.generator) < self.prob)

    def _sparse(self, pl_module: L.LightningModule, targets: Tensor | MixedTargets) -> bool:
        return isinstance(targets, Tensor) and targets.ndim == 1 and getattr(pl_module, "sparse_mixed_targets", False)

    def _unmixed_targets(self, pl_module: L.LightningModule, targets: Tensor | MixedTargets) -> Tensor | MixedTargets:
        """Targets of a batch that is not mixed: dense (smoothed) one-hot rows, or sparse with the mixin."""
        assert self._num_classes is not None  # set in setup
        if isinstance(targets, MixedTargets):
            return targets
        if self._sparse(pl_module, targets):
            return MixedTargets.unmixed(targets, self._num_classes, self.label_smoothing)
        return one_hot(targets, self._num_classes, self.label_smoothing)

    def _mixed_targets(
        self, pl_module: L.LightningModule, targets: Tensor | MixedTargets, lam: float | Tensor, index: Tensor
    ) -> Tensor | MixedTargets:
        """``lam * t + (1 - lam) * t[index]``: built in one pass for index targets, sparse with the mixin."""
        assert self._num_classes is not None  # set in setup
        if isinstance(targets, MixedTargets) or self._sparse(pl_module, targets):
            base = targets if isinstance(targets, MixedTargets) else self._unmixed_targets(pl_module, targets)
            assert isinstance(base, MixedTargets)
            lam_t = lam.to(base.lam) if isinstance(lam, Tensor) else torch.full_like(base.lam, lam)
            return base._replace(targets_b=base.targets_a[index.to(base.targets_a.device)], lam=lam_t)
        out = None
        if targets.ndim == 1:  # index targets are built into a reused (N, K) tensor (see the module notes)
            out = self._target_output.take_empty((targets.shape[0], self._num_classes), torch.float32, targets.device)
        return mixed_one_hot(targets, self._num_classes, lam, index, self.label_smoothing, out=out)

    def _write(self, batch: Any, key: BatchKey, value: Any, name: str) -> None:
        set_entry(batch, key, value, name)

    # --- statistics ------------------------------------------------------------------------------------
    def _record(self, lam: float | Tensor | None = None, *, cutmix: bool = False) -> None:
        """Count one training batch: mixed with ``lam`` (a float or per-sample tensor), or not when ``None``."""
        stats = self._stats
        stats["batches"] += 1.0
        if lam is None:
            stats["lambda"] += 1.0
            return
        stats["mixed"] += 1.0
        stats["cutmix"] += float(cutmix)
        stats["lambda"] += float(lam.mean()) if isinstance(lam, Tensor) else float(lam)

    def _epoch_metrics(self) -> dict[str, float]:
        stats = self._stats
        batches = stats["batches"]
        return {
            f"{self.log_name}/mixed_fraction": stats["mixed"] / batches,
            f"{self.log_name}/lambda": stats["lambda"] / batches,
        }

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stats = dict.fromkeys(self._stats, 0.0)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_name or self._stats["batches"] == 0:
            return
        pl_module.log_dict(self._epoch_metrics(), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._output.release()
        self._target_output.release()

    def _mix_out(self, inputs: Tensor) -> Tensor | None:
        """Where to write the mixed inputs: the reusable output (see the module notes), or ``None`` to allocate."""
        return self._output.take(inputs)
